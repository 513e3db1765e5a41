"""LLM judges: `judge:self` and `judge:<URL of an OpenAI-compatible endpoint>`.

A judge reads a prompt made from `judge_template` (placeholders: {prompt}, {completion} and
the dataset's columns; by default it asks for a 0-10 score of how well the completion
answers the prompt) and answers with a score. The reward is that score divided by 10, so it
sits in [0, 1] like the rule-based rewards. An answer without a score in 0-10 is None (left
out of the weighted sum) and counted in `rewards/<name>/none_frac`.

- `judge:self` asks the policy's own base weights, with the adapter off: the reference model
  the KL term already uses, so it costs no memory for weights, only a greedy generation of
  `judge_max_tokens` tokens per completion, in chunks of `generation_chunk_size`.
- `judge:<URL>` asks a server (llama.cpp's llama-server, Ollama, vLLM; on this machine or the
  LAN) through the chat-completions API: `judge_concurrency` requests at once, each with
  `judge_timeout_s` and up to `judge_retries` retries (connection errors, timeouts, 429 and
  5xx). The API key, if any, is read from the environment variable named by
  `judge_api_key_env` at request time: it is never in the config, the run directory or a log.
  A request that still fails scores None; a batch where every request failed stops the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from lowvram_grpo.rewards.base import TRAINER_KEYWORDS, RewardFunctionError, completion_text

DEFAULT_JUDGE_TEMPLATE = (
    "Rate how well the response answers the request, from 0 (not at all) to 10 (perfectly).\n\n"
    "Request:\n{prompt}\n\nResponse:\n{completion}\n\n"
    "Reply with the score only: one whole number from 0 to 10.")
MAX_SCORE = 10.0
RETRY_STATUS = {408, 429, 500, 502, 503, 504}

_NUMBER = r"(\d+(?:\.\d+)?)"
# Most specific first: "Score: 7", "7/10" or "7 out of 10", then a reply that is just a number.
_SCORE_PATTERNS = [re.compile(rf"score\s*(?:is|of|=|:)?\s*\**\s*{_NUMBER}", re.IGNORECASE),
                   re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*10\b", re.IGNORECASE),
                   re.compile(rf"^\W*{_NUMBER}\W*$")]


def parse_score(reply: str) -> float | None:
    """The 0-10 score in a judge's reply, or None if there is none (or it is out of range)."""
    text = reply.strip()
    for pattern in _SCORE_PATTERNS:
        match = pattern.search(text)
        if match:
            value = float(match.group(1))
            return value if 0 <= value <= MAX_SCORE else None
    return None


def judge_prompt(template: str, prompt, completion, columns: dict) -> str:
    """The judge's prompt for one completion: `template` with {prompt}, {completion} and columns."""
    from lowvram_grpo.errors import DatasetError
    from lowvram_grpo.prompts import fill_template

    if isinstance(prompt, list):  # a conversation: the judge sees it as role-labelled turns
        prompt = "\n".join(f"{m['role']}: {completion_text(m)}" for m in prompt)
    row = {**columns, "prompt": prompt, "completion": completion_text(completion)}
    try:
        return fill_template(template, row)
    except DatasetError as err:
        raise RewardFunctionError(f"judge_template: {str(err).replace('prompt_template', 'judge_template')}") from None


def _dataset_columns(kwargs: dict) -> dict:
    """The dataset's columns among a reward call's keywords (not completion_ids, nor TRL's
    trainer_state, log_metric and log_extra)."""
    return {k: v for k, v in kwargs.items() if k != "completion_ids" and k not in TRAINER_KEYWORDS}


def _prompts(template: str, prompts, completions, columns: dict) -> list[str]:
    return [judge_prompt(template, p, c, {k: v[i] for k, v in columns.items()})
            for i, (p, c) in enumerate(zip(prompts, completions))]


def _score(reply: str | None) -> float | None:
    score = parse_score(reply) if reply is not None else None
    return None if score is None else score / MAX_SCORE


class SelfJudge:
    """judge:self: the policy's base weights (adapter off) judge each completion, greedily."""

    __name__ = "judge_self"

    def __init__(self, context, config):
        self.context, self.config = context, config  # the policy joins the context when it loads

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        from lowvram_grpo.model import reference_model
        from lowvram_grpo.rollout import generate_greedy

        policy, tokenizer = self.context.policy, self.context.tokenizer
        if policy is None or tokenizer is None:
            raise RewardFunctionError(
                "reward 'judge:self' judges with the policy's own base weights, so it needs the policy: "
                "it works in training and evaluation, or pass RewardContext(config, policy, tokenizer)")

        texts = _prompts(self.config.judge_template or DEFAULT_JUDGE_TEMPLATE, prompts, completions,
                         _dataset_columns(columns))
        if tokenizer.chat_template:
            texts = [[{"role": "user", "content": t}] for t in texts]
        chunk = self.config.generation_chunk_size
        off = reference_model(policy) if hasattr(policy, "disable_adapter") else contextlib.nullcontext()
        with off:
            rollout = generate_greedy(
                policy, tokenizer, texts, max_new_tokens=self.config.judge_max_tokens,
                max_prompt_length=self.config.max_prompt_length + self.config.max_completion_length + 256,
                chunk_size=chunk if isinstance(chunk, int) else 8)
        return [_score(reply) for reply in rollout.completions]


class EndpointJudge:
    """judge:<URL>: an OpenAI-compatible chat-completions server judges each completion.

    httpx does the HTTP (JSON, timeouts, one pool of connections shared by the threads). Two
    things stay ours, because httpx has neither: retrying on 408/429/5xx and on read timeouts
    (its transport retries only failed connects), and running `judge_concurrency` requests at
    once with a thread pool rather than asyncio, since a reward is called synchronously, also
    from threads that already run an event loop (a notebook, the app), where asyncio.run fails.
    """

    def __init__(self, url: str, config):
        self.config = config
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.__name__ = "judge_" + re.sub(r"[^\w.-]", "_", httpx.URL(url).netloc.decode() or "endpoint")

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        texts = _prompts(self.config.judge_template or DEFAULT_JUDGE_TEMPLATE, prompts, completions,
                         _dataset_columns(columns))
        if not texts:
            return []
        workers = min(self.config.judge_concurrency, len(texts))
        key = os.environ.get(self.config.judge_api_key_env)  # read now: never stored in the config
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(headers=headers, timeout=self.config.judge_timeout_s,
                          limits=httpx.Limits(max_connections=workers)) as client, \
                ThreadPoolExecutor(max_workers=workers) as pool:
            replies = list(pool.map(lambda text: self.ask(client, text), texts))
        if all(reply is None for reply in replies):
            raise RewardFunctionError(
                f"judge {self.endpoint}: no request succeeded ({self._last_error}); is the server running, "
                "and do judge_model and judge_api_key_env match it?")
        return [_score(reply) for reply in replies]

    _last_error = "no answer"

    def ask(self, client: httpx.Client, text: str) -> str | None:
        """The server's reply to one judge prompt; None when every try failed."""
        body = {"model": self.config.judge_model, "messages": [{"role": "user", "content": text}],
                "max_tokens": self.config.judge_max_tokens, "temperature": 0}
        for attempt in range(self.config.judge_retries + 1):
            if attempt:
                time.sleep(min(0.25 * 2 ** attempt, 5.0))
            try:
                response = client.post(self.endpoint, json=body)
            except httpx.TimeoutException:
                self._last_error = f"TimeoutError: no answer within judge_timeout_s={self.config.judge_timeout_s} s"
                continue
            except httpx.TransportError as err:  # refused, reset, DNS: the server may be starting
                self._last_error = f"{type(err).__name__}: {err}"
                continue
            if response.is_error:
                # Status and reason only: error texts may echo request headers, and so the key.
                self._last_error = f"HTTP {response.status_code} {response.reason_phrase}"
                if response.status_code not in RETRY_STATUS:
                    raise RewardFunctionError(
                        f"judge {self.endpoint}: the server refused the request ({self._last_error}); check "
                        f"judge_model ({self.config.judge_model!r}) and the key in ${self.config.judge_api_key_env}")
                continue
            try:
                return completion_text(response.json()["choices"][0]["message"])
            except (ValueError, KeyError, IndexError, TypeError):
                self._last_error = "a reply that is not a chat completion"
        return None


def judge(target: str, context) -> SelfJudge | EndpointJudge:
    """The judge for `judge:<target>` (`self` or a URL), set up from a RewardContext."""
    from lowvram_grpo.config import TrainConfig

    config = context.config or TrainConfig()
    if target == "self":
        return SelfJudge(context, config)
    if target.startswith(("http://", "https://")):
        return EndpointJudge(target, config)
    raise RewardFunctionError(
        f"reward 'judge:{target}': a judge is judge:self or judge:<URL of an OpenAI-compatible endpoint>, "
        "e.g. judge:http://127.0.0.1:8080/v1")
