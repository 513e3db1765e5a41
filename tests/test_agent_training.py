"""A GRPO step with tools, end to end on the CPU: the scripted Qwen-format model of
tests/agent_helpers.py behind LoRA, the trainer's own grpo_step. A hanging tool and a failing
one are survived and counted, reward functions see the trajectories, the tool results are out
of the loss, and the adapter moves."""

import time

import pytest
import torch
from conftest import sgd_learner

from lowvram_grpo.agent.loop import Agent
from lowvram_grpo.config import load_config
from lowvram_grpo.rewards import RewardFunction, load_reward_functions
from lowvram_grpo.sampling import PromptSampler
from lowvram_grpo.trainer import grpo_step, seed_everything
from tests.agent_helpers import HANGING, TOOLS, chat_tokenizer, hangs, scripted_model

ANSWERS = {0: "The sum is 5.", 2: "errors everywhere", HANGING: "gave up"}


@pytest.fixture
def step(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = load_config(overrides={
        "output_dir": str(tmp_path / "run"), "num_generations": 2, "prompts_per_step": 3, "max_prompt_length": 1024,
        "max_completion_length": 300, "generation_chunk_size": 4, "micro_batch_size": 3, "beta": 0.04,
        "log_completions_every": 1, "num_completions_to_log": 6, "quantization": "none"})
    tokenizer = chat_tokenizer()
    seed_everything(0)
    policy = get_peft_model(scripted_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  init_lora_weights=False))
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    seen = []

    def final_answer_is(prompts, completions, answer, **kwargs):
        seen.extend(completions)
        return [float(c[-1]["content"] == a) for c, a in zip(completions, answer)]

    rewards = load_reward_functions([]) + [RewardFunction("final_answer_is", final_answer_is, 1.0)]
    learner = sgd_learner(config, policy, start, tokenizer, rewards)
    learner.agent = Agent(tools=[*TOOLS, hangs], timeout=0.5, max_iterations=2)
    learner.agent.prepare(tokenizer)
    rows = [{"prompt": [{"role": "user", "content": f"q{k}"}], "answer": a} for k, a in ANSWERS.items()]
    return learner, rows, start, seen


def test_a_step_with_tools_survives_and_counts_failures_and_trains(step):
    learner, rows, start, seen = step
    started = time.monotonic()
    record, samples = grpo_step(learner, rows, PromptSampler(len(rows), 0), step=1)
    assert time.monotonic() - started < 30, "the hanging tool held the step up"

    # q0: one good call; q2: three failing calls; the hanging one: one timed-out call. G=2 each.
    assert record["tools/call_frequency"] == pytest.approx((1 + 3 + 1) * 2 / 6)
    assert record["tools/failure_frequency"] == pytest.approx(4 / 5)
    assert record["tools/calls/hangs"] == pytest.approx(2 / 6)
    assert record["tools/turns_per_trajectory"] == pytest.approx(2.0)
    # Rewards saw the trajectories (assistant turn, tool results, final turn) and read the answer.
    assert all(c[0]["role"] == "assistant" and c[1]["role"] == "tool" for c in seen)
    assert record["reward"] == pytest.approx(1.0)
    timed_out = [c for c in seen if c[0]["tool_calls"][0]["function"]["name"] == "hangs"][0]
    assert "did not return within 0.5 seconds" in timed_out[1]["content"]
    # The logged samples carry the trajectory for the completions browser.
    assert all(s["messages"][-1]["content"] == s["completion"] for s in samples)
    # Length metrics count the model's tokens only: fewer than the trajectories' tokens.
    assert record["completions/max_length"] < 300 and record["completions/mean_length"] > 0
    assert torch.isfinite(torch.tensor(record["loss"])) and record["kl"] >= 0
    moved = [n for n, p in learner.policy.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert moved, "the adapter did not move"


def test_out_of_memory_in_a_later_turn_redoes_the_rollouts_once(step):
    """An OOM while the second turn generates: generation is redone with half the chunk, from
    fresh episodes, so the step's tool counts and trajectories are those of a step without it."""
    learner, rows, start, _ = step
    base = learner.policy.get_base_model()
    generate, failures = base.generate, []
    tool_response = learner.tokenizer.convert_tokens_to_ids("<tool_response>")

    def oom_in_second_turn(input_ids, **kwargs):
        if not failures and (input_ids == tool_response).any():  # a context with a tool result in it
            failures.append(input_ids.size(0))
            raise torch.OutOfMemoryError("injected")
        return generate(input_ids, **kwargs)

    reference, reference_samples = grpo_step(learner, rows, PromptSampler(len(rows), 0), step=1)
    base.generate = oom_in_second_turn
    with torch.no_grad():
        for name, p in learner.policy.named_parameters():
            if p.requires_grad:
                p.copy_(start[name])
    record, samples = grpo_step(learner, rows, PromptSampler(len(rows), 0), step=1)
    assert failures and record["oom_retries"] == 1 and record["generation_chunk_size"] == 2
    for key in ("tools/call_frequency", "tools/failure_frequency", "tools/turns_per_trajectory", "reward", "loss"):
        assert record[key] == pytest.approx(reference[key]), key
    assert [s["messages"] for s in samples] == [s["messages"] for s in reference_samples]


def test_a_rollout_func_brings_its_own_loop(step):
    """TRL's rollout_func contract: token ids per sequence, env_mask as the tool mask, extra
    fields as reward columns."""
    learner, rows, _, _ = step
    tokenizer, seen = learner.tokenizer, {}

    def rollout_func(prompts, trainer):
        assert trainer.processing_class is tokenizer and trainer.args.num_generations == 2
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=False) for p in prompts]
        model_part, env_part = tokenizer("12", add_special_tokens=False)["input_ids"], [tokenizer.eos_token_id]
        return {"prompt_ids": ids, "completion_ids": [model_part + env_part] * len(ids), "logprobs": None,
                "env_mask": [[1, 1, 0]] * len(ids), "score": [float(i % 2) for i in range(len(ids))]}

    def from_the_loop(prompts, completions, score, **kwargs):
        seen["completions"] = completions
        return score

    learner.agent = Agent(tools=[], rollout_func=rollout_func)
    learner.reward_functions = [RewardFunction("from_the_loop", from_the_loop, 1.0)]
    record, _ = grpo_step(learner, rows, PromptSampler(len(rows), 0), step=1)
    assert record["reward"] == pytest.approx(0.5)
    assert record["completions/mean_length"] == 2.0  # the env_mask's model tokens only
    assert seen["completions"][0] == [{"role": "assistant", "content": "12"}]


def test_evaluation_plays_whole_trajectories(step):
    """eval_every with tools: greedy trajectories through the tools, scored on the final answer."""
    from lowvram_grpo.evaluate import evaluate

    learner, rows, _, _ = step
    learner.config.tools = ["tests.agent_helpers.add"]
    result = evaluate(learner.policy, learner.tokenizer, rows[:1], learner.reward_functions, learner.config)
    assert result["eval/reward"] == 1.0  # q0: calls add, reads 5, answers "The sum is 5."


@pytest.fixture(scope="module")
def quick_tools_model(tmp_path_factory):
    """The tiny tools model's recipe, less trained (seconds, not minutes): it calls the calculator
    now and then, which is all a resume test needs."""
    from lowvram_grpo.builtin.tiny_tools_model import build_tiny_tools_model

    return build_tiny_tools_model(tmp_path_factory.mktemp("tiny-tools") / "model", warmup_problems=64,
                                  warmup_steps=40)


def test_resume_with_tools_matches_an_uninterrupted_run(quick_tools_model, tmp_path):
    """Interrupted after step 3 (checkpoint at 2), then resumed: the same adapter and the same
    step records as a run that went straight through, tool calls included."""
    from safetensors.torch import load_file

    from lowvram_grpo import rundir
    from lowvram_grpo.trainer import train

    def config(name):
        return load_config(preset="tiny-cpu-tools", overrides={
            "model_name_or_path": str(quick_tools_model), "output_dir": str(tmp_path / name), "max_steps": 4,
            "save_every": 2, "prompts_per_step": 4, "keep_checkpoints": 0})

    train(config("straight"), progress=False)

    def interrupt_after_step_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config("resumed"), progress=False, on_step=interrupt_after_step_3)
    train(config("resumed"), resume=True, progress=False)

    straight, resumed = (load_file(tmp_path / n / "final" / "adapter_model.safetensors") for n in ("straight", "resumed"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    records = [rundir.read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("straight", "resumed")]
    keys = ("step", "reward", "loss", "tools/call_frequency", "tools/turns_per_trajectory")
    assert [[r[k] for k in keys] for r in records[1]] == [[r[k] for k in keys] for r in records[0]]
    assert any(r["tools/call_frequency"] > 0 for r in records[0]), "no tool was called: nothing tested"


def test_the_workbench_samples_and_scores_multi_turn_groups(quick_tools_model):
    """The app's workbench samples the base model's groups through the tools, as the first
    training step would, and shows each trajectory turn by turn."""
    from lowvram_grpo.app.try_rewards import BaseSampler
    from lowvram_grpo.app.use_adapter import ModelSlot

    config = load_config(preset="tiny-cpu-tools", overrides={"model_name_or_path": str(quick_tools_model)})
    seed_everything(0)
    groups = BaseSampler(ModelSlot()).sample(config, num_rows=4)
    assert groups.columns == ["row", "prompt", "answer", "completion", "arith_answer", "total", "advantage"]
    called = [row for row in groups.table if "[calls add]" in row[3]]
    assert called, "no trajectory called the calculator"
    for _, _prompt, answer, completion, reward, total, _ in called:
        lines = completion.split("\n")  # [text,] the call, the calculator's result[, the answer]
        call = next(i for i, line in enumerate(lines) if line.startswith("[calls add] {"))
        assert lines[call + 1].startswith("[add returned] ")
        assert reward == (1.0 if lines[-1] == answer else 0.0) == total
