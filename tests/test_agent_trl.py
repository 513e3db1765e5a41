"""Multi-turn rollouts against TRL 1.16's tool loop, on the same (scripted) model outputs.

TRL's `GRPOTrainer._generate` (prompt tokenisation, its `_tool_call_loop`, response parsing,
tool execution, the budget rule) and our `agent.generate_tool_rollouts` are fed the same prompts
and a model whose replies are scripted (tests/agent_helpers.py), and must build the same token
sequences: prompt ids, completion ids with the tool results spliced in, tool masks, the message
lists reward functions receive, and the same tool call and failure counts. TRL's side parses with
the response template TRL sets for Qwen and Llama 3.1; ours with the one agent.parsing derives from the chat
template, so the parsers are compared too.
"""

import warnings

import pytest

from lowvram_grpo.agent.loop import Agent, generate_tool_rollouts, tool_metrics
from lowvram_grpo.agent.tools import ToolBox
from tests.agent_helpers import LLAMA_SCRIPT, SCRIPT, TOOLS, chat_tokenizer, scripted_model


def prompts_for(template: str) -> list:
    script = LLAMA_SCRIPT if template.startswith("llama") else SCRIPT
    return [[{"role": "user", "content": f"q{k}"}] for k in range(len(script))]


def trl_generate(tmp_path, max_completion_length, max_iterations, template):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = chat_tokenizer(template)
    model = scripted_model(tokenizer)
    prompts = prompts_for(template)
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8,
                      num_generations=2, max_completion_length=max_completion_length,
                      max_tool_calling_iterations=max_iterations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, processing_class=tokenizer, tools=TOOLS,
                              train_dataset=Dataset.from_dict({"prompt": prompts}))
    # What _generate_and_score_completions sets up before generating: each rollout's tools.
    trainer._sync_tool_dicts = [{t.__name__: t for t in TOOLS if t.__name__ != "mul"} for _ in prompts]
    trainer._async_tool_dicts = [{"mul": TOOLS[1]} for _ in prompts]
    prompt_ids, completion_ids, tool_mask, completions, *_ = trainer._generate([list(p) for p in prompts])
    metrics = trainer._metrics["train"]
    return prompt_ids, completion_ids, tool_mask, completions, metrics


def our_generate(max_completion_length, max_iterations, template, chunk_size=3):
    tokenizer = chat_tokenizer(template)
    model = scripted_model(tokenizer)
    prompts = prompts_for(template)
    agent = Agent(tools=TOOLS, max_iterations=max_iterations)
    agent.prepare(tokenizer)
    toolboxes = [ToolBox(TOOLS, timeout=10.0) for _ in prompts]
    return generate_tool_rollouts(model, tokenizer, prompts, toolboxes, num_generations=1, chunk_size=chunk_size,
                                  max_prompt_length=4096, max_completion_length=max_completion_length,
                                  max_iterations=max_iterations, do_sample=False)


# Qwen2.5's template as it is; Qwen3's is not prefix-preserving, so both sides swap in its
# training variant (TRL's get_training_chat_template, our agent.parsing.TRAINING_TEMPLATES).
# Llama 3.1: one bare-JSON call per turn, results as "ipython" turns (its own template is
# prefix-preserving; our response template for it is derived from the chat template).
@pytest.mark.parametrize("template, max_completion_length, max_iterations",
                         [("qwen2_5", 400, 3), ("qwen2_5", 230, None), ("qwen3", 400, 3), ("llama3_1", 300, 3)],
                         ids=["qwen2.5-iterations-limit", "qwen2.5-budget-limit", "qwen3-iterations-limit",
                              "llama3.1-iterations-limit"])
def test_token_sequences_equal_trls_tool_loop(tmp_path, template, max_completion_length, max_iterations):
    prompt_ids, completion_ids, tool_mask, completions, metrics = trl_generate(
        tmp_path, max_completion_length, max_iterations, template)
    rollout = our_generate(max_completion_length, max_iterations, template)

    for i in range(len(prompts_for(template))):
        ours_prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        ours_completion = rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()
        assert ours_prompt == prompt_ids[i], f"prompt {i}"
        assert ours_completion == completion_ids[i], f"completion {i}"
        assert rollout.tool_mask[i][:len(ours_completion)].tolist() == tool_mask[i], f"tool mask {i}"
        assert rollout.completion_messages[i] == completions[i], f"messages {i}"
    ours = tool_metrics(rollout.tool_counts)
    assert ours["tools/call_frequency"] == pytest.approx(metrics["tools/call_frequency"][-1])
    assert ours["tools/failure_frequency"] == pytest.approx(metrics["tools/failure_frequency"][-1])
    # The cases the script means to exercise really happened.
    assert any(0 in m for m in tool_mask), "no tool result was spliced in"
    assert ours["tools/failure_frequency"] > 0
