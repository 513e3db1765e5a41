"""Judges: judge:self (the policy's base weights, adapter off) and judge:<URL> against a fake
OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lowvram_grpo.config import ConfigError, TrainConfig, load_config
from lowvram_grpo.rewards.base import RewardContext, RewardFunctionError
from lowvram_grpo.rewards.judges import DEFAULT_JUDGE_TEMPLATE, judge_prompt, parse_score
from lowvram_grpo.rewards.loading import load_reward_functions, resolve_reward
from lowvram_grpo.rewards.scoring import score_completions


@pytest.mark.parametrize("reply, score", [
    ("7", 7.0), (" 10\n", 10.0), ("Score: 8", 8.0), ("**Score:** 6.5", 6.5), ("I'd give it 9/10.", 9.0),
    ("3 out of 10", 3.0), ("score = 0", 0.0),
    ("", None), ("great answer", None), ("42", None), ("Score: 11", None), ("between 3 and 5", None)])
def test_scores_are_parsed_robustly(reply, score):
    assert parse_score(reply) == score


def test_the_template_fills_prompt_completion_and_columns():
    text = judge_prompt("Q: {prompt}\nA: {completion}\nReference: {answer}", "2+2?",
                        [{"role": "assistant", "content": "4"}], {"answer": "4"})
    assert text == "Q: 2+2?\nA: 4\nReference: 4"
    assert "Request:\n2+2?" in judge_prompt(DEFAULT_JUDGE_TEMPLATE, "2+2?", "4", {})
    with pytest.raises(RewardFunctionError, match="judge_template uses {nope}"):
        judge_prompt("{nope}", "p", "c", {})


def test_a_judge_must_be_self_or_a_url():
    with pytest.raises(ConfigError, match="judge:self"):
        load_config(overrides={"rewards": ["judge:gpt"]})
    with pytest.raises(RewardFunctionError, match="needs the policy"):
        resolve_reward("judge:self")(prompts=["p"], completions=["c"])


# --- judge:<URL> -----------------------------------------------------------------------------------


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions: replies with `reply(prompt)`, records
    requests, headers and the most requests it served at once; `fail_first` 503s; `delay` s."""

    def __init__(self, reply=lambda prompt: "7", fail_first: int = 0, delay: float = 0.0, status: int = 200):
        self.requests, self.headers = [], []
        self.active = self.most_at_once = 0
        self.fail_left, self.lock = fail_first, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, body))
                    server.headers.append(dict(self.headers))
                    server.active += 1
                    server.most_at_once = max(server.most_at_once, server.active)
                    failing = server.fail_left > 0
                    server.fail_left -= 1
                time.sleep(delay)
                with server.lock:
                    server.active -= 1
                code = 503 if failing else status
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content":
                                   reply(body["messages"][0]["content"])}}]}).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def endpoint_judge(server: FakeServer, **settings):
    config = TrainConfig(rewards=[f"judge:{server.url}"], **settings)
    return resolve_reward(f"judge:{server.url}", RewardContext(config))


def test_endpoint_scores_each_completion_with_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    server = FakeServer(reply=lambda prompt: "Score: 9" if "Response:\ngood" in prompt else "2")
    try:
        fn = endpoint_judge(server, judge_api_key_env="MY_JUDGE_KEY", judge_model="qwen-judge", judge_max_tokens=5)
        assert fn(prompts=["q1", "q2"], completions=["good", "bad"]) == [0.9, 0.2]
        path, body = server.requests[0]
        assert path == "/v1/chat/completions"
        assert body["model"] == "qwen-judge" and body["max_tokens"] == 5 and body["temperature"] == 0
        assert all(h["Authorization"] == "Bearer sk-test-123" for h in server.headers)
    finally:
        server.close()


def test_the_key_is_neither_in_the_config_nor_in_errors(monkeypatch, tmp_path):
    from lowvram_grpo.config import save_config

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-999")
    server = FakeServer(status=401)
    try:
        config = TrainConfig(rewards=[f"judge:{server.url}"])
        save_config(config, tmp_path / "config.yaml")
        assert "sk-secret-999" not in (tmp_path / "config.yaml").read_text()
        with pytest.raises(RewardFunctionError, match="HTTP 401") as err:
            resolve_reward(f"judge:{server.url}", RewardContext(config))(prompts=["q"], completions=["c"])
        assert "sk-secret-999" not in str(err.value)
    finally:
        server.close()


def test_requests_run_concurrently_up_to_the_bound():
    server = FakeServer(delay=0.2)
    try:
        fn = endpoint_judge(server, judge_concurrency=3)
        assert fn(prompts=["q"] * 9, completions=["c"] * 9) == [0.7] * 9
        assert server.most_at_once == 3
    finally:
        server.close()


def test_failed_requests_are_retried():
    server = FakeServer(fail_first=2)
    try:
        fn = endpoint_judge(server, judge_retries=2, judge_concurrency=1)
        assert fn(prompts=["q"], completions=["c"]) == [0.7]
        assert len(server.requests) == 3
    finally:
        server.close()


def test_a_server_that_never_answers_times_out_with_one_clear_error():
    server = FakeServer(delay=3.0)
    try:
        fn = endpoint_judge(server, judge_timeout_s=0.3, judge_retries=1)
        started = time.monotonic()
        with pytest.raises(RewardFunctionError, match="no request succeeded.*TimeoutError"):
            fn(prompts=["q"], completions=["c"])
        assert time.monotonic() - started < 2.5
    finally:
        server.close()


def test_unparseable_answers_are_none_and_counted_in_the_metrics():
    server = FakeServer(reply=lambda prompt: "8" if "Response:\nfine" in prompt else "no idea")
    try:
        (reward,) = load_reward_functions(TrainConfig(rewards=[f"judge:{server.url}"]).rewards)
        scores = score_completions([reward], ["q"] * 4, ["fine", "x", "fine", "y"], None, {})
        metrics = scores.metrics()
        assert metrics[f"rewards/{reward.name}/none_frac"] == 0.5
        assert metrics[f"rewards/{reward.name}/mean"] == pytest.approx(0.8)
    finally:
        server.close()


# --- judge:self ------------------------------------------------------------------------------------


def test_self_judge_uses_the_base_weights_with_the_adapter_off(tiny_path):
    from lowvram_grpo.model import load_policy, reference_model
    from lowvram_grpo.rollout import generate_greedy

    config = load_config(preset="tiny-cpu", overrides={"judge_template": "{prompt}", "judge_max_tokens": 2})
    policy, tokenizer = load_policy(config, torch.device("cpu"))
    context = RewardContext(config, policy, tokenizer)
    (reward,) = load_reward_functions(load_config(overrides={"rewards": ["judge:self"]}).rewards, context)
    assert reward.name == "judge_self"
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(3)]
    completions = ["1"] * len(prompts)
    scores = reward.fn(prompts=prompts, completions=completions)

    # Oracle: the base model's own greedy answers (as a user turn: the tiny model has a chat
    # template), parsed and divided by 10.
    with reference_model(policy):
        replies = generate_greedy(policy, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                  max_new_tokens=2, max_prompt_length=64).completions
    expected = [None if parse_score(r) is None else parse_score(r) / 10 for r in replies]
    assert scores == expected and any(s is not None for s in scores)

    # Training the adapter does not change the judge: it is the reference, not the policy.
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    assert reward.fn(prompts=prompts, completions=completions) == scores
