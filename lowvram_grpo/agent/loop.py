"""Multi-turn rollouts: the model calls tools, reads their results and continues.

One trajectory, as TRL 1.16's tool loop builds it (token for token, tests/test_agent_trl.py):

    prompt (chat template, tools shown)  ->  turn 1 (model)  ->  tool results (chat template)
      ->  turn 2 (model)  ->  tool results  ->  ...  ->  a turn without a tool call

The completion is everything after the prompt: the model's turns and the tool results spliced
between them as the chat template writes them, token ids appended (never re-tokenised).
`tool_mask` marks which completion tokens the model generated (1) and which a tool wrote (0):
tool results stay in the context of later turns but are no part of the loss, the KL, the
entropy or the length metrics (Rollout.loss_mask).

A trajectory ends when a turn has no tool call, after `max_tool_calling_iterations` rounds of
calls, or when the next tool results would push the completion past `max_completion_length`
(which counts the whole trajectory): those results are dropped and the trajectory ends with
the turn that asked for them, as TRL does. A turn is cut off at what is left of the budget.

Generation runs turn by turn, a memory-sized chunk of sequences at a time (the same
`generation_chunk_size` as single-turn rollouts): only the trajectories that are still going
take a slot in the next turn, so one that finished early frees its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowvram_grpo.agent.parsing import check_chat_template, parse_assistant, tool_suffix_ids
from lowvram_grpo.agent.tools import (
    ToolBox,
    ToolCounts,
    environment_methods,
    load_environment,
    load_object,
    load_tools,
    tool_schema,
)
from lowvram_grpo.config import ConfigError
from lowvram_grpo.errors import UserError
from lowvram_grpo.prompts import chat_template_kwargs, set_chat_template_kwargs
from lowvram_grpo.rewards.base import RewardFunction
from lowvram_grpo.rollout import Rollout, eos_token_ids, generate_completions, left_pad, tokenize_prompts


@dataclass
class Agent:
    """A run's tools and environment: what each rollout may call, and how long a call may take."""

    tools: list[Callable]  # the standalone tools, shared by every rollout
    environment: Callable | None = None  # the environment class, one instance per rollout
    timeout: float | None = None  # tool_timeout
    max_iterations: int | None = None  # max_tool_calling_iterations (None: no limit)
    rollout_func: Callable | None = None  # the user's own loop, in place of ours (call_rollout_func)

    @classmethod
    def from_config(cls, config) -> Agent | None:
        """The configured tools, environment or rollout_func, loaded and checked; None without any."""
        if not config.tools and not config.environment_factory and not config.rollout_func:
            return None
        environment = load_environment(config.environment_factory) if config.environment_factory else None
        rollout_func = load_object(config.rollout_func, "rollout_func") if config.rollout_func else None
        if rollout_func is not None and not callable(rollout_func):
            raise ConfigError(f"rollout_func: '{config.rollout_func}' is a {type(rollout_func).__name__}, not a "
                              "function")
        return cls(tools=load_tools(config.tools, config), environment=environment, timeout=config.tool_timeout,
                   max_iterations=config.max_tool_calling_iterations, rollout_func=rollout_func)

    def reward_functions(self, timeout: float | None) -> list[RewardFunction]:
        """What the agent adds to the run's reward functions: the environment's get_reward, if any."""
        reward = self.environment_reward()
        return [] if reward is None else [RewardFunction(name=reward.__name__, fn=reward, weight=1.0, timeout=timeout)]

    def environment_reward(self) -> Callable | None:
        """The environment's get_reward() as a reward function (TRL's: named after the class,
        it reads each rollout's environment), or None."""
        if self.environment is None or not callable(getattr(self.environment, "get_reward", None)):
            return None
        kind = self.environment

        def reward(environments, **kwargs) -> list[float | None]:
            return [e.get_reward() if type(e) is kind else None for e in environments]

        reward.__name__ = kind.__name__
        return reward

    def schemas(self) -> list[dict]:
        """Every tool the model is shown (the environment's methods after the standalone tools)."""
        methods = environment_methods(self.environment()) if self.environment is not None else []
        return [tool_schema(t) for t in self.tools + methods]

    def prepare(self, tokenizer) -> None:
        """Make the tokenizer show the tools in every prompt (generation, the length filter,
        evaluation alike) and parse the model's tool calls. (A rollout_func alone renders its
        prompts itself, as in TRL.)"""
        if not self.tools and self.environment is None:
            return
        set_chat_template_kwargs(tokenizer, {**chat_template_kwargs(tokenizer), "tools": self.schemas()})
        check_chat_template(tokenizer)

    def start(self, rows: list[dict], num_generations: int, should_stop: Callable[[], bool] | None = None
              ) -> tuple[list, list[ToolBox], list | None]:
        """Per sequence (each row's G rollouts contiguous): its prompt, its tools (their calls
        abandoned once `should_stop()` is true), and its environment (None without one), whose
        reset(**row) text is added to the prompt."""
        prompts, toolboxes, environments = [], [], []
        for row in rows:
            for _ in range(num_generations):
                prompt = row["prompt"]
                methods = []
                if self.environment is not None:
                    environment = self.environment()
                    environments.append(environment)
                    methods = environment_methods(environment)
                    observation = environment.reset(**row)
                    if observation is not None:  # a new last message: the row itself stays as it was
                        prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
                prompts.append(prompt)
                toolboxes.append(ToolBox(self.tools + methods, self.timeout, should_stop))
        return prompts, toolboxes, environments if self.environment is not None else None


def refuse_images(config, rows: list[dict]) -> None:
    """Trajectories with tool calls are re-tokenised turn by turn from text: they carry no pixel
    values, so an image prompt would be trained on without its images. Refused, naming both."""
    if any(row.get("images") for row in rows):
        key = next(k for k in ("tools", "environment_factory", "rollout_func") if getattr(config, k))
        raise ConfigError(f"{key}: cannot be combined with the dataset's images (its image/images column): multi-turn "
                          f"rollouts with tools do not carry images; use tools with text prompts, or images without "
                          f"{key}")


@torch.no_grad()
def generate_tool_rollouts(model, tokenizer, prompts: list, toolboxes: list[ToolBox], *, num_generations: int,
                           chunk_size: int, max_prompt_length: int, max_completion_length: int,
                           max_iterations: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                           top_k: int = 0, do_sample: bool = True,
                           should_stop: Callable[[], bool] | None = None) -> Rollout:
    """One trajectory per prompt (`prompts` and `toolboxes` one per sequence, each group's G
    contiguous), generated turn by turn, `chunk_size` sequences at a time (module docstring)."""
    prompt_ids, num_truncated = tokenize_prompts(tokenizer, prompts, max_prompt_length)
    eos_ids = eos_token_ids(model, tokenizer)
    context_limit = model.config.get_text_config().max_position_embeddings
    schemas = chat_template_kwargs(tokenizer).get("tools")
    n = len(prompt_ids)

    def turn(contexts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        """The model's next turn after each context: up to its first EOS, at most its budget."""
        out = []
        for start in range(0, len(contexts), chunk_size):
            chunk, chunk_budgets = contexts[start:start + chunk_size], budgets[start:start + chunk_size]
            if max(chunk_budgets) == 0:
                out += [[] for _ in chunk]
                continue
            ids = generate_completions(
                model, tokenizer, chunk, chunk_size=len(chunk), max_new_tokens=max(chunk_budgets), eos_ids=eos_ids,
                temperature=temperature, top_p=top_p, top_k=top_k, do_sample=do_sample, should_stop=should_stop)
            for row, budget in zip(ids.tolist(), chunk_budgets):
                ends = [i for i, t in enumerate(row) if t in eos_ids]
                out.append(row[:ends[0] + 1 if ends else len(row)][:budget])
        return out

    completions = turn(prompt_ids, [max_completion_length] * n)
    tool_mask = [[1] * len(ids) for ids in completions]
    messages = [[parse_assistant(tokenizer, ids, prompt_ids[i], schemas)] for i, ids in enumerate(completions)]
    counts = [ToolCounts(turns=1) for _ in range(n)]
    active = [i for i in range(n) if messages[i][-1].get("tool_calls")]
    iteration = 0
    while active and (max_iterations is None or iteration < max_iterations):
        contexts: dict[int, tuple[list[int], int]] = {}
        for i in active:
            results = toolboxes[i].run(messages[i][-1]["tool_calls"], counts[i])
            suffix = tool_suffix_ids(tokenizer, results)
            context = prompt_ids[i] + completions[i] + suffix
            if len(context) - len(prompt_ids[i]) > max_completion_length or len(context) >= context_limit:
                continue  # over budget: the results are dropped, the trajectory ends here
            messages[i] += results
            contexts[i] = (context, len(suffix))
        active = list(contexts)
        if not active:
            break
        budgets = [max_completion_length - (len(contexts[i][0]) - len(prompt_ids[i])) for i in active]
        going = []
        for i, ids in zip(active, turn([contexts[i][0] for i in active], budgets)):
            context, suffix_length = contexts[i]
            tool_mask[i] += [0] * suffix_length + [1] * len(ids)
            completions[i] = context[len(prompt_ids[i]):] + ids
            counts[i].turns += 1
            if ids:  # nothing left of the budget: no turn to read
                message = parse_assistant(tokenizer, ids, context, schemas)
                messages[i].append(message)
                if message.get("tool_calls"):
                    going.append(i)
        active = going
        iteration += 1

    pad = tokenizer.pad_token_id
    completion_ids, completion_mask = _right_pad(completions, pad)
    mask_of_tools, _ = _right_pad(tool_mask, 1)
    all_prompt_ids, all_prompt_mask = left_pad(prompt_ids, pad)
    ends = set(eos_ids) | {pad}
    return Rollout(
        prompt_ids=all_prompt_ids, prompt_mask=all_prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, completions=[final_answer(m) for m in messages],
        is_clipped=torch.tensor([not ids or ids[-1] not in ends for ids in completions]),
        num_prompts_truncated=num_truncated // num_generations, tool_mask=mask_of_tools,
        completion_messages=messages, tool_counts=counts)


ROLLOUT_FUNC_KEYS = ("prompt_ids", "completion_ids", "logprobs")


class RolloutFuncError(UserError, RuntimeError):
    """A rollout_func that returned something other than TRL's contract; the message says what."""


@dataclass
class RolloutTrainer:
    """What a rollout_func gets as `trainer`: the attributes of TRL's GRPOTrainer such loops use."""

    model: Any  # the policy (LoRA on), to generate with
    processing_class: Any  # the tokenizer
    args: Any  # the run's TrainConfig (num_generations, max_completion_length, temperature, ...)


def call_rollout_func(rollout_func: Callable, learner, rows: list[dict]) -> tuple[Rollout, dict[str, list]]:
    """The user's own loop, TRL's contract: `rollout_func(prompts, trainer)` gets one prompt per
    sequence (each row's G contiguous) and returns token ids per sequence, `prompt_ids`,
    `completion_ids` and `logprobs` (unused here: log-probs are recomputed), optionally `env_mask`
    (1 for the model's tokens, 0 for what the environment wrote: our tool_mask); every other key
    is one value per sequence, handed to the reward functions as a column."""
    config, tokenizer = learner.config, learner.tokenizer
    prompts = [row["prompt"] for row in rows for _ in range(config.num_generations)]
    name = getattr(rollout_func, "__name__", "rollout_func")
    output = rollout_func(prompts, RolloutTrainer(learner.policy, tokenizer, config))
    missing = [key for key in ROLLOUT_FUNC_KEYS if not isinstance(output, dict) or key not in output]
    if missing:
        raise RolloutFuncError(f"rollout_func '{name}' must return a dict with keys {', '.join(ROLLOUT_FUNC_KEYS)}; "
                           f"{', '.join(missing)} missing")
    n = len(prompts)
    wrong = {k: len(v) for k, v in output.items() if k != "logprobs" and v is not None and len(v) != n}
    if wrong:
        raise RolloutFuncError(f"rollout_func '{name}' returned {wrong} values, but there are {n} sequences (one per "
                           "prompt it was given)")
    completions = [list(ids)[:config.max_completion_length] for ids in output["completion_ids"]]
    completion_ids, completion_mask = _right_pad(completions, tokenizer.pad_token_id)
    env_mask = output.get("env_mask")
    tool_mask = _right_pad([list(m)[:len(c)] for m, c in zip(env_mask, completions)], 1)[0] \
        if env_mask is not None else torch.ones_like(completion_ids)
    prompt_ids, prompt_mask = left_pad([list(ids) for ids in output["prompt_ids"]], tokenizer.pad_token_id)
    ends = set(eos_token_ids(learner.policy, tokenizer)) | {tokenizer.pad_token_id}
    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, completions=tokenizer.batch_decode(completions, skip_special_tokens=True),
        is_clipped=torch.tensor([not ids or ids[-1] not in ends for ids in completions]), num_prompts_truncated=0,
        tool_mask=tool_mask)
    extra = {k: list(v) for k, v in output.items() if k not in (*ROLLOUT_FUNC_KEYS, "env_mask")}
    return rollout, extra


def final_answer(messages: list[dict]) -> str:
    """The text of the trajectory's last assistant turn (what completion_text reads)."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return message.get("content") or ""
    return ""


def _right_pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def tool_metrics(counts: list[ToolCounts]) -> dict[str, float]:
    """The step's tool use, TRL's names first: tools/call_frequency (calls per trajectory),
    tools/failure_frequency (failed calls per call), then calls per trajectory of each tool and
    model turns per trajectory."""
    n = max(len(counts), 1)
    calls = sum(c.calls for c in counts)
    record = {"tools/call_frequency": calls / n,
              "tools/failure_frequency": sum(c.failures for c in counts) / calls if calls else 0.0,
              "tools/turns_per_trajectory": sum(c.turns for c in counts) / n}
    for name in sorted({name for c in counts for name in c.per_tool}):
        record[f"tools/calls/{name}"] = sum(c.per_tool.get(name, 0) for c in counts) / n
    return record
