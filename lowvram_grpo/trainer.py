"""The GRPO training loop.

One step, top to bottom (see `train`):
  1. take the next `prompts_per_step` prompts
  2. roll out G completions for each with the adapter ON, in memory-sized chunks
  3. score every completion with the reward functions (weighted sum)
  4. advantages: normalise rewards within each prompt's group
  5. reference log-probs with the adapter OFF (only if beta > 0), old log-probs (only if
     num_iterations > 1): both without gradients, micro-batch by micro-batch
  6. update: per micro-batch, log-probs with gradients (gradient checkpointing on, LM head in
     chunks), clipped surrogate + beta * KL, backward; then clip and step the optimizer
  7. log metrics, sample completions, maybe checkpoint

With several processes (`accelerate launch` / `--num-processes N`, see distributed.py) each
process runs this same loop on its share of the step's prompts; the few lines that make them
act as one (gather rewards, all-reduce gradients, gather metrics) call distributed.py, and
only rank 0 writes the run directory. One process runs exactly the loop above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lowvram_grpo import distributed, grpo, metrics
from lowvram_grpo.agent.loop import Agent, refuse_images, tool_metrics
from lowvram_grpo.checkpoint import (
    load_checkpoint,
    read_resume_state,
    restore_rng_state,
    rng_state,
    save_adapter,
    save_checkpoint,
    set_rng_state,
)
from lowvram_grpo.config import ConfigError, TrainConfig
from lowvram_grpo.data import PromptRows, finish_prompt_data, read_prompt_rows
from lowvram_grpo.entropy_control import EntropyControl
from lowvram_grpo.evaluate import evaluate
from lowvram_grpo.health import HealthMonitor
from lowvram_grpo.model import (
    check_model_available,
    compute_dtype,
    enable_long_context,
    load_policy,
    reference_model,
    resolve_model_path,
)
from lowvram_grpo.planning.backoff import retry_on_oom
from lowvram_grpo.planning.chunking import LOGPROBS, Chunking
from lowvram_grpo.planning.planner import resolve_chunking, resolve_long_context
from lowvram_grpo.reporting import make_reporters
from lowvram_grpo.rewards.base import RewardContext, RewardFunction, RewardFunctionError
from lowvram_grpo.rewards.loading import load_reward_functions
from lowvram_grpo.rewards.scoring import RewardScores
from lowvram_grpo.rollout import Rollout
from lowvram_grpo.rundir import RunDir, TrainResult
from lowvram_grpo.sampling import (
    PromptSampler,
    _gather_scores,
    _informative_sequence_indices,
    _resample_until_informative,
    _sample_groups,
)
from lowvram_grpo.stopping import StepInterrupted, StopRequested
from lowvram_grpo.update import _update, frozen_logprobs

logger = logging.getLogger(__name__)


# --- optimizer -------------------------------------------------------------------------------


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    if config.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ValueError("optimizer: paged_adamw_8bit needs a CUDA GPU; use optimizer=adamw on the CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer):
    from transformers import get_scheduler

    total = config.max_steps * config.num_iterations  # optimizer steps
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total)


def build_loss_scaler(config: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler when the model computes in fp16 (GPUs without bf16, such as Colab's T4).

    The GRPO loss is averaged over thousands of completion tokens, so the gradients flowing back
    through fp16 activations are tiny, and fp16 rounds values under ~6e-8 to zero. As torch.amp
    does, the loss is multiplied by a large scale before backward and the gradients divided by it
    before clipping; a step whose scaled gradients overflow is skipped and the scale halved.
    bf16 and fp32 have fp32's range and need none.
    """
    if compute_dtype(config, device) != torch.float16:
        return None
    if config.lora_modules_to_save:
        # Their trainable copies would be fp16 too: AdamW on fp16 weights loses small updates,
        # and gradient unscaling refuses fp16 gradients.
        raise ConfigError("lora_modules_to_save: whole modules cannot be trained in fp16 (the compute dtype "
                          "on GPUs without bf16, such as the T4); leave lora_modules_to_save empty to train "
                          "LoRA alone, or set dtype=float32")
    return torch.amp.GradScaler(device.type)


# --- the loop --------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          on_phase: Callable[[str], AbstractContextManager] | None = None) -> TrainResult:
    """Run GRPO as configured; returns how the run ended and where its adapter is.

    With `resume=True` the run continues from the newest checkpoint in `config.output_dir`.
    `on_step` receives each step's metrics (the notebook uses it for a live plot); `on_phase`
    is entered around each memory phase of a step (see Learner.on_phase).
    Started by a launcher (see distributed.py), every process calls this; rank 0 writes the run
    directory, reports and shows the progress bar, and gets `on_step` calls.
    """
    world = distributed.world()
    run = RunDir(config.output_dir)
    if not resume and run.holds_a_run():
        raise ConfigError(f"output_dir: {run.path} already holds a training run; continue it with "
                          f"`lowvram-grpo train --resume {run.path}` or choose another output_dir")
    # The user's inputs before anything is created or loaded: a typo in a reward name should
    # cost seconds, not a model load, and leave no half-made run directory behind.
    inputs = check_inputs(config)
    if world.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_status("running", 0, config.max_steps)
    try:
        distributed.check_world_size(config, world.world_size)
        # Reporters first: a missing tensorboard/wandb package should fail in seconds, not
        # after the model has loaded.
        with StopRequested(same_request_within=1.0 if world.distributed else 0.0, announce=world.is_main) as stop, \
                make_reporters(config.report_to if world.is_main else [], run.path, config.to_dict()) as reporters:
            result = _train(config, inputs, run, resume, progress, on_step, on_phase, stop, reporters, world)
        distributed.finish()
        return result
    except BaseException as err:
        _write_failure(run, config, err, world)
        distributed.abort()  # without this a failed multi-process run leaves its process group behind
        raise


@dataclass
class RunInputs:
    """The user's reward functions and prompts, checked before the model loads."""

    reward_functions: list[RewardFunction]
    prompts: PromptRows
    # What judges and reward models use from the run; the policy joins it once it has loaded.
    reward_context: RewardContext
    agent: Agent | None = None  # the tools and environment of multi-turn rollouts (None: single-turn)


def check_inputs(config: TrainConfig, check_model: bool = True) -> RunInputs:
    """Everything about a run that can be wrong without loading the model: the model can be
    found (a local directory, or a hub id cached or reachable), every reward function loads,
    the dataset reads and validates. Raises the one-line error of the first problem."""
    if check_model:
        check_model_available(config.model_name_or_path)
    reward_context = RewardContext(config)
    reward_functions = load_reward_functions(config.rewards, reward_context, timeout=config.reward_timeout)
    agent = Agent.from_config(config)
    if agent is not None:
        reward_functions += agent.reward_functions(config.reward_timeout)
    if not reward_functions:
        raise ConfigError(f"rewards: none given, and environment_factory {config.environment_factory} has no "
                          "get_reward(); add a reward function or a get_reward method")
    prompts = read_prompt_rows(config)
    if config.eval_every and not prompts.eval and not config.eval_fraction:
        raise ConfigError("eval_every: there is no eval split; set eval_fraction (e.g. 0.05) or eval_dataset")
    if agent is not None and prompts.train and isinstance(prompts.train[0]["prompt"], str):
        key = "tools" if config.tools else "environment_factory"
        raise ConfigError(f"{key}: the prompts are plain text, but tools are shown to the model through the chat "
                          "template: use conversational prompts (a dataset of message lists, or set system_prompt)")
    if agent is not None:
        refuse_images(config, prompts.train + prompts.eval)
    return RunInputs(reward_functions=reward_functions, prompts=prompts, reward_context=reward_context, agent=agent)


def _write_failure(run: RunDir, config: TrainConfig, err: BaseException, world) -> None:
    """status.json says "failed", with the error. With several processes, the first failure
    is the one to keep: rank 0 does not overwrite another process's error with its own
    (usually a lost connection to that process)."""
    status = run.status() or {}
    if world.distributed and status.get("state") == "failed" and status.get("pid") != os.getpid():
        return
    message = f"{type(err).__name__}: {err}" if not isinstance(err, KeyboardInterrupt) else "interrupted"
    if world.distributed and not world.is_main:
        message = f"process {world.rank}: {message}"
    try:
        run.write_status("failed", status.get("step", 0), config.max_steps, error=message,
                         traceback=traceback.format_exc())
    except OSError:  # e.g. another machine, where the run directory does not exist
        if world.is_main:
            raise


@dataclass
class Learner:
    """The policy and everything that updates it: what one step works with."""

    config: TrainConfig
    chunking: Chunking  # the chunk sizes in force (planned, shrunk by out-of-memory back-off)
    policy: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    device: torch.device
    reward_functions: list[RewardFunction]
    # Entered around each memory phase of a step (chunking.PHASES), e.g. to measure its peak.
    on_phase: Callable[[str], AbstractContextManager] = lambda phase: contextlib.nullcontext()
    # The entropy bonus's coefficient; adaptive, it changes after every update. None: from the config.
    entropy_control: EntropyControl | None = None
    agent: Agent | None = None  # tools and environment: multi-turn rollouts (agent/loop.py)
    objective: grpo.Objective = dataclasses.field(init=False)  # the loss, from the config

    def __post_init__(self) -> None:
        if self.entropy_control is None:
            self.entropy_control = EntropyControl.from_config(self.config)
        self.objective = grpo.Objective.from_config(self.config)

    def resume_state(self, sampler: PromptSampler) -> dict[str, Any]:
        """What a checkpoint needs besides the adapter weights and the random state."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "sampler": sampler.state_dict(), "chunking": self.chunking.as_dict(),
                "entropy_control": self.entropy_control.state_dict()}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])
        # Chunk sizes shrunk by out-of-memory back-off stay shrunk.
        for key, value in state.get("chunking", {}).items():
            setattr(self.chunking, key, value)
        # The adaptive coefficient continues where it was (a fixed one is the config's).
        if self.entropy_control.adaptive and "entropy_control" in state:
            self.entropy_control.load_state_dict(state["entropy_control"])


def _train(config: TrainConfig, inputs: RunInputs, run: RunDir, resume: bool, progress: bool,
           on_step: Callable | None, on_phase: Callable | None, stop: StopRequested, reporters,
           world: distributed.World) -> TrainResult:
    main = world.is_main  # rank 0 (the only process, usually) writes the run directory
    seed_everything(config.seed)
    device = world.device
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    # Read the checkpoint before the model loads: resuming with the wrong number of processes
    # should fail in seconds.
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run.path}; start it without --resume")
    state = read_resume_state(checkpoint, world.world_size) if checkpoint is not None else None
    if main:
        run.save_config(config)  # as the user gave it ("auto" stays "auto")
    chunking = resolve_chunking(config, device, announce=main)
    scaler = build_loss_scaler(config, device)  # before the model loads: a refusal comes in seconds
    with distributed.main_process_first():  # a model to build or download: once, not per process
        resolve_model_path(config.model_name_or_path)
    offload_activations, sequence_chunk_size = resolve_long_context(config, device, announce=main)
    policy, tokenizer = load_policy(config, device)
    enable_long_context(policy, offload_activations, sequence_chunk_size)
    if inputs.agent is not None:  # before the length filter: the tools' schemas are part of every prompt
        inputs.agent.prepare(tokenizer)
    if world.rank > 0:
        # Same seed as rank 0 until here (same LoRA initialisation); from here on each process
        # samples its own completions.
        seed_everything(config.seed + world.rank)
    data = finish_prompt_data(inputs.prompts, config, tokenizer)
    dropped = f"; dropped {data.num_dropped_too_long} prompts longer than max_prompt_length" \
        if data.num_dropped_too_long else ""
    if main:
        print(f"dataset: {data.source}{dropped}", flush=True)
    # judge:self judges with this policy's base weights; reward models load on its device.
    inputs.reward_context.policy, inputs.reward_context.tokenizer = policy, tokenizer
    params = [p for p in policy.parameters() if p.requires_grad]
    distributed.broadcast_parameters(params)  # every process starts from rank 0's LoRA weights
    optimizer = build_optimizer(config, params, device)
    learner = Learner(config, chunking, policy, tokenizer, optimizer, build_scheduler(config, optimizer), scaler,
                      device, inputs.reward_functions, **({"on_phase": on_phase} if on_phase else {}),
                      agent=inputs.agent)
    sampler = PromptSampler(len(data.train), config.seed)

    start_step = 0
    if checkpoint is not None:
        load_checkpoint(checkpoint, policy, state)
        learner.load_resume_state(state)
        sampler = PromptSampler(len(data.train), config.seed, **state["sampler"])
        restore_rng_state(state, world.rank)
        start_step = state["step"]
        if main:  # steps after the checkpoint are redone, so their records would appear twice
            run.truncate_after(start_step)

    def checkpoint_now(step: int) -> None:
        rng_states = distributed.gather_objects(rng_state())  # every process's, to resume each
        if main:
            save_checkpoint(run.path, step, policy, learner.resume_state(sampler), keep=config.keep_checkpoints,
                            rng_states=rng_states)

    def end(state: str, step: int) -> TrainResult:
        if bar:
            bar.close()
        if main:
            run.write_status(state, step, config.max_steps)
        adapter = run.final_adapter if state == "finished" else run.latest_checkpoint()
        return TrainResult(run_dir=run, state=state, step=step, adapter=adapter)

    bar = _progress_bar(progress and main, start_step, config.max_steps)
    policy.train()
    step = start_step
    warned_no_reward = False
    health = HealthMonitor(run.metrics() if resume else [])  # warnings in the log (the app shows them too)
    while step < config.max_steps:
        step += 1
        # Generation and rewards change neither the weights nor the optimizer, so a step that
        # ends in one of them leaves the previous step's state but for the random state and the
        # data position: keep those, to checkpoint the previous step exactly.
        before_step = rng_state(), sampler.state_dict()
        try:
            # Several processes stop only between steps, together (a collective half-entered
            # by some processes would hang the others).
            record, samples = grpo_step(learner, data.train, sampler, step,
                                        should_stop=None if world.distributed else stop)
        except (StepInterrupted, RewardFunctionError) as err:
            if not world.distributed:
                set_rng_state(before_step[0])
                sampler = PromptSampler(len(data.train), config.seed, **before_step[1])
                if step - 1 > start_step:
                    checkpoint_now(step - 1)
            if isinstance(err, RewardFunctionError):
                if bar:
                    bar.close()
                raise  # status "failed", naming the function
            return end("stopped", step - 1)
        if main and not warned_no_reward and math.isnan(record["reward"]):
            warned_no_reward = True
            logger.warning(f"step {step}: no reward function ({', '.join(r.name for r in learner.reward_functions)}) "
                           "returned a reward for any completion (all None), so this step taught nothing; check "
                           "that the reward functions fit this dataset (e.g. its answer column). Shown once.")
        if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
            record.update(evaluate(policy, tokenizer, data.eval, learner.reward_functions, config))
        if main:
            run.append_step(record, samples)
            for warning in health.update(record, samples):
                logger.warning(f"run health: {warning}")
            reporters.log(record, step)
            if samples:
                reporters.log_completions(samples, step)
            if on_step:
                on_step(record)
        if bar:
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl', 0.0):.4f}")
        # All processes stop together, after the same step, when any of them was asked to.
        if distributed.any_rank(stop.requested):
            if main:
                run.write_status("stopping", step, config.max_steps)
            checkpoint_now(step)
            return end("stopped", step)
        if step % config.save_every == 0 or step == config.max_steps:
            checkpoint_now(step)
        if main:
            run.write_status("running", step, config.max_steps)
    if main:
        save_adapter(policy, run.final_adapter)
    return end("finished", step)


def grpo_step(learner: Learner, rows: list[dict], sampler: PromptSampler, step: int,
              should_stop: Callable[[], bool] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One GRPO step (steps 1-7 of the module docstring); returns its metrics record and,
    every `log_completions_every` steps, sampled completions to log. Once `should_stop()` is
    true, generation and reward calls give up and StepInterrupted is raised, before the update."""
    config, chunking, policy, device = learner.config, learner.chunking, learner.policy, learner.device
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    G = config.num_generations
    oom_events: list[str] = []
    trainer_state = _trainer_state(config, sampler, step)

    # 1-3. Prompts, rollouts (adapter on), rewards.
    def sample_round():
        return _sample_groups(learner, rows, sampler, trainer_state, oom_events, should_stop)

    batch, rollout, scores, generation_time = sample_round()
    dynamic: dict[str, float] = {}
    if config.zero_std_groups == "resample":
        batch, rollout, scores, dynamic = _resample_until_informative(
            config, (batch, rollout, scores, generation_time), sample_round, learner.tokenizer.pad_token_id)
        generation_time += dynamic["dynamic_sampling/extra_generation_time"]
    prompts = [row["prompt"] for row in batch]

    # 4. Advantages within each prompt's group. A process holds whole groups, but
    #    scale_rewards="batch" needs the std of the whole step: so gather the rewards of every
    #    process, normalise them exactly as one process would, and keep this process's rows.
    all_scores = _gather_scores(scores)
    weights = torch.tensor([r.weight for r in learner.reward_functions], dtype=torch.float32)
    all_advantages, reward_std = grpo.step_advantages(all_scores.per_function, all_scores.total, weights, G,
                                                      config.multi_objective_aggregation, config.scale_rewards)
    advantages = _own_rows(all_advantages, rollout.num_sequences)

    # What the update trains on: without truncated completions' tokens if asked; the loss is
    # normalised by this whole step (before skipping groups, so that skipping them does not
    # change the update).
    trained = rollout.mask_truncated() if config.mask_truncated_completions else rollout
    step_counts = (distributed.all_reduce_sum(trained.num_sequences),
                   distributed.all_reduce_sum(float(trained.loss_mask.sum())))
    trained_advantages = advantages
    if config.zero_std_groups != "keep":
        # Groups whose rewards are all equal have advantage 0: no policy gradient. Leave them
        # out of the log-prob and backward passes (with "resample" only the few that are left
        # when max_resample_rounds ran out).
        informative_indices = _informative_sequence_indices(scores, G, config.multi_objective_aggregation)
        skipped = distributed.all_reduce_sum({
            "groups": (trained.num_sequences - len(informative_indices)) // G,
            "tokens": float(trained.loss_mask.sum() - trained.loss_mask[informative_indices].sum())})
        dynamic["dynamic_sampling/skipped_groups"] = skipped["groups"]
        dynamic["dynamic_sampling/skipped_token_fraction"] = skipped["tokens"] / max(step_counts[1], 1.0)
        trained, trained_advantages = trained.select(informative_indices), advantages[informative_indices]

    # 5. Frozen log-probs: reference (adapter off) for the KL, old policy for the ratio.
    def logprobs_now() -> torch.Tensor:
        return retry_on_oom(LOGPROBS, chunking, lambda sizes: frozen_logprobs(
            policy, trained, sizes, config.temperature, device), oom_events)

    ref_logps = old_logps = None
    with learner.on_phase(LOGPROBS):
        if config.beta > 0:
            with reference_model(policy):
                ref_logps = logprobs_now()
        if config.num_iterations > 1:
            old_logps = logprobs_now()

    # 6. Update(s). With num_iterations > 1 the same rollouts are reused for several
    #    optimizer steps; the clipped ratio against old_logps keeps each one close.
    totals = metrics.mean_over_updates([
        _update(learner, trained, trained_advantages.to(device), ref_logps, old_logps, oom_events, step_counts)
        for _ in range(config.num_iterations)])

    # 7. Metrics (TRL's names) and samples, over the whole step (gathered from every process).
    # The model's own tokens: tool results are not its output (TRL counts them the same way).
    lengths = distributed.all_gather_tensor(rollout.loss_mask.sum(1).float())
    clipped = distributed.all_gather_tensor(rollout.is_clipped)
    counts = distributed.all_reduce_sum({"num_prompts_truncated": rollout.num_prompts_truncated,
                                         "oom_retries": len(oom_events)})
    record: dict[str, Any] = {
        "step": step,
        "reward": float(torch.nanmean(all_scores.total)),
        "reward_std": float(torch.nanmean(reward_std)),
        **all_scores.metrics(),
        "frac_reward_zero_std": float(torch.isclose(reward_std, torch.zeros_like(reward_std)).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(clipped.float().mean()),
        **totals,
        **_logged_metrics(scores),
        **(tool_metrics([c for part in distributed.gather_objects(rollout.tool_counts) for c in part])
           if rollout.tool_counts is not None else {}),
        **dynamic,
        "learning_rate": learner.scheduler.get_last_lr()[0],
        "num_prompts_truncated": counts["num_prompts_truncated"],
        **chunking.as_dict(),
        "oom_retries": counts["oom_retries"],
        **_long_context_metrics(learner, rollout),
    }
    # The slowest process sets the pace; peak memory is the largest of any process's.
    slowest = distributed.all_reduce_max({"step_time": time.perf_counter() - started,
                                          "generation_time": generation_time,
                                          "peak_memory_gb": metrics.peak_memory_gb(device)})
    generated_tokens = dynamic.get("dynamic_sampling/generated_tokens", float(lengths.sum()))
    record.update({"step_time": slowest["step_time"], "generation_time": slowest["generation_time"],
                   "tokens_per_second": generated_tokens / slowest["step_time"],
                   "peak_memory_gb": slowest["peak_memory_gb"]})
    samples = []
    if step % config.log_completions_every == 0 or step == 1:
        # The step's first completions, wherever they were generated.
        local = metrics.sample_records(step, prompts, rollout.completions, scores, advantages, config,
                                       rollout.completion_messages, images=[row.get("images") for row in batch])
        samples = [s for part in distributed.gather_objects(local) for s in part][:config.num_completions_to_log]
    return record, samples


def _long_context_metrics(learner: Learner, rollout: Rollout) -> dict[str, float]:
    """metrics.long_context_memory of this step, the largest of any process's."""
    return {name: distributed.all_reduce_max(value) for name, value in metrics.long_context_memory(
        learner.policy, learner.chunking.generation_chunk_size, rollout).items()}


def _trainer_state(config: TrainConfig, sampler: PromptSampler, step: int):
    """What TRL passes reward functions as `trainer_state`: a transformers TrainerState with the
    optimizer steps done so far (`global_step`), `max_steps` and the epoch."""
    from transformers import TrainerState

    epoch = sampler.epoch + sampler.position / max(sampler.num_rows, 1)
    return TrainerState(global_step=(step - 1) * config.num_iterations,
                        max_steps=config.max_steps * config.num_iterations, epoch=epoch)


def _own_rows(gathered: torch.Tensor, local_count: int) -> torch.Tensor:
    """This process's rows of a tensor gathered from every process in rank order (the shares
    can differ in size once dynamic sampling has chosen groups)."""
    sizes = distributed.gather_objects(local_count)
    start = sum(sizes[:distributed.world().rank])
    return gathered[start:start + local_count]


def _logged_metrics(scores: RewardScores) -> dict[str, float]:
    """The step's mean of each value reward functions gave `log_metric`, over every process."""
    totals: dict[str, list[float]] = {}
    for logged in distributed.gather_objects(scores.logged):
        for name, values in logged.items():
            totals.setdefault(name, []).extend(values)
    return {name: sum(values) / len(values) for name, values in sorted(totals.items()) if values}


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="GRPO", unit="step", dynamic_ncols=True)
