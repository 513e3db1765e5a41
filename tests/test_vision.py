"""Images in prompts, on tiny random image-text models of real architectures (Qwen2.5-VL,
Qwen3-VL, Gemma 3; see lowvram_grpo/builtin/tiny_vlm.py), on the CPU:

- the data: image columns in every form, each bad image one line naming its row, shrinking;
- the oracle: TRL 1.16's GRPOTrainer, given the same images, prompts and completions, computes
  the same loss and the same LoRA gradients as our path (our processor encoding, our per-row
  pixel inputs, sequence_logprobs with model_inputs, grpo_loss);
- generation with chunks equals generation without, each prompt's images processed once;
- 4-bit training with images resumes exactly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import pytest
import torch
from conftest import assert_step_two_resumes_exactly
from PIL import Image

from lowvram_grpo import vision
from lowvram_grpo.builtin.tiny_vlm import ARCHITECTURES, IMAGE_SIZES, build_tiny_vlm
from lowvram_grpo.config import load_config
from lowvram_grpo.data import read_prompt_rows
from lowvram_grpo.errors import DatasetError
from lowvram_grpo.grpo import Objective, grpo_loss
from lowvram_grpo.logprobs import sequence_logprobs
from lowvram_grpo.rollout import Rollout, generate_rollouts, left_pad

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 200)]


def square(size: int, colour, corner: int = 0) -> Image.Image:
    """A white image with one coloured square in one of its four corners."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    half = size // 2
    x, y = (corner % 2) * half, (corner // 2) * half
    image.paste(Image.new("RGB", (half, half), colour), (x, y))
    return image


# --- data ----------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _config(dataset, **overrides):
    return load_config(overrides={"dataset": str(dataset), "answer_column": None, **overrides})


def test_image_columns_in_every_form_load_as_rgb_with_placeholders(tmp_path):
    (tmp_path / "pics").mkdir()
    square(40, COLOURS[0]).save(tmp_path / "pics" / "red.png")
    Image.new("L", (30, 20), 128).save(tmp_path / "grey.png")
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    rows = [{"prompt": "what colour?", "image": "../pics/red.png"},  # relative to the dataset file
            {"prompt": "what colour?", "image": str(tmp_path / "grey.png")},
            {"prompt": [{"role": "user", "content": [{"type": "text", "text": "two:"}, {"type": "image"},
                                                      {"type": "image"}]}],
             "images": ["../pics/red.png", "../grey.png"]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    train = read_prompt_rows(_config(data, image_size=20)).train
    assert [len(r["images"]) for r in train] == [1, 1, 2]
    assert all(img.mode == "RGB" for r in train for img in r["images"])
    assert train[0]["images"][0].size == (20, 20) and train[1]["images"][0].size == (20, 13)  # shrunk, aspect kept
    # A plain prompt becomes a user message whose images come first (TRL's layout)...
    assert train[0]["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                   "text": "what colour?"}]}]
    # ...and placeholders the prompt places itself stay where they are.
    assert [p["type"] for p in train[2]["prompt"][0]["content"]] == ["text", "image", "image"]

    # Bytes and a datasets Image feature ({"bytes", "path"}, what a hub dataset gives undecoded).
    from datasets import Dataset
    from datasets import Image as ImageFeature

    table = Dataset.from_dict({"prompt": ["a", "b"], "image": [png_bytes(square(16, COLOURS[1]))] * 2})
    table = table.cast_column("image", ImageFeature(decode=False))
    table.to_parquet(tmp_path / "hub.parquet")
    rows = read_prompt_rows(_config(tmp_path / "hub.parquet", max_pixels=100)).train
    assert rows[0]["images"][0].size == (10, 10) and rows[0]["images"][0].getpixel((0, 0)) == COLOURS[1]


@pytest.mark.parametrize("problem", ["missing", "corrupt", "mode", "too large", "count", "url offline"])
def test_a_bad_image_is_one_line_naming_its_row(tmp_path, problem, monkeypatch):
    good = tmp_path / "ok.png"
    square(16, COLOURS[0]).save(good)
    bad = {"missing": "nowhere.png", "corrupt": "corrupt.png", "mode": "float.tif", "too large": "big.png",
           "count": "ok.png", "url offline": "https://example.com/square.png"}[problem]
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("F", (8, 8), 1.5).save(tmp_path / "float.tif")
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 1000)
    rows = [{"prompt": "q", "image": "ok.png"}, {"prompt": "q", "image": "ok.png"}, {"prompt": "q", "image": bad}]
    if problem == "count":  # two placeholders for one image
        rows[2]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError) as caught:
        read_prompt_rows(_config(data))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{data} line 3: ")
    expected = {"missing": "not found", "corrupt": "not an image PIL can read", "mode": "mode F",
                "too large": "40x40 pixels", "count": "2 image placeholders but the row has 1",
                "url offline": "could not be fetched (URLError: <urlopen error no network>); download the images"}[problem]
    assert expected in message, message


def test_bad_images_stop_a_run_before_the_model_loads(tmp_path, monkeypatch):
    from lowvram_grpo import model
    from lowvram_grpo.trainer import train

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "q", "image": "missing.png"}))
    monkeypatch.setattr(model, "load_policy", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(DatasetError, match=r"line 1: image file .*missing.png not found"):
        train(_config(data, output_dir=str(tmp_path / "run"), rewards=["format_soft"]), progress=False)


def test_tools_with_images_are_refused_naming_both(tmp_path):
    """Tool-calling trajectories carry no pixel values: a run asking for both stops with one line
    that names the tools key and the images, before the model loads."""
    from lowvram_grpo.config import ConfigError
    from lowvram_grpo.trainer import check_inputs

    square(20, COLOURS[0]).save(tmp_path / "red.png")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "how many squares?", "image": "red.png"}))
    tools = {"tools": ["lowvram_grpo.builtin.calculator.add"], "rewards": ["format_soft"]}
    with pytest.raises(ConfigError, match=r"^tools: cannot be combined with image_size \(images\)"):
        _config(data, image_size=32, **tools)
    with pytest.raises(ConfigError, match=r"^tools: cannot be combined with the dataset's images"):
        check_inputs(_config(data, **tools), check_model=False)


# --- the oracle: TRL 1.16 on the same images, prompts and completions ------------------------------

TEMPERATURE = 0.7
MICRO_BATCHES = (slice(0, 3), slice(3, 6))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def vlm(request, tmp_path_factory):
    """(kind, model directory, processor) of a tiny random image-text model."""
    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    _, processor = build_tiny_vlm(kind, path)
    return kind, path, processor


def _prompts(kind: str):
    """Three image prompts of different lengths (left padding matters), each twice (groups of 2)."""
    size = IMAGE_SIZES[kind]
    texts = ["what colour?", "which corner is it in?", "say it"]
    prompts = [vision.with_images(vision.image_prompt(t, 1), [square(size, COLOURS[i], corner=i)])
               for i, t in enumerate(texts)]
    return [p for p in prompts for _ in range(2)]


def _trl_trainer(model, processor, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, activation_checkpointing=False,
                      per_device_train_batch_size=6, num_generations=2, max_completion_length=8,
                      temperature=TEMPERATURE, epsilon=0.2, epsilon_high=0.28)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=vision.language_model_targets(model, "all-linear"),
                      lora_dropout=0.0, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              processing_class=processor, peft_config=lora,
                              train_dataset=Dataset.from_dict({"prompt": ["x"] * 6}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = len(MICRO_BATCHES)
    trainer.args.steps_per_generation = len(MICRO_BATCHES)
    return trainer


def _trl_forward_fields(processor, prompts, completion_width: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """What TRL's _generate_and_score_completions hands _compute_loss for image prompts: the
    processor over every sequence's images and text, per-token fields extended with zeros over
    the completion. Returns (fields, prompt_ids, prompt_mask)."""
    texts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    images = [[part["image"] for part in p[0]["content"] if part["type"] == "image"] for p in prompts]
    encoded = processor(images=images, text=texts, padding=True, return_tensors="pt")
    fields = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in fields:
            fields[key] = torch.cat([fields[key], fields[key].new_zeros((len(prompts), completion_width))], 1)
    fields["num_images"] = [len(i) for i in images]
    return fields, encoded["input_ids"], encoded["attention_mask"]


def _slice_fields(fields: dict, rows: slice) -> dict:
    """TRL's micro-batch of its multimodal fields (its own splitting, as its buffer does)."""
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    split = split_pixel_values_by_grid(dict(fields))
    out = {}
    for key, value in split.items():
        if key == "pixel_values" and isinstance(value, list):
            out[key] = value[rows]
        elif key == "pixel_values" and "image_grid_thw" not in fields:
            out[key] = value[rows]  # one image per row
        elif isinstance(value, (torch.Tensor, list)):
            out[key] = value[rows]
    return unsplit_pixel_values_by_grid(out)


@pytest.mark.parametrize("loss_type, beta, old_given", [("dapo", 0.04, True), ("grpo", 0.0, False)],
                         ids=["dapo-beta0.04-off_policy", "grpo-beta0-on_policy"])
def test_loss_and_lora_gradients_match_trl_with_images(vlm, tmp_path, loss_type, beta, old_given):
    from transformers import AutoModelForImageTextToText

    kind, path, processor = vlm
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    trainer = _trl_trainer(model, processor, tmp_path)
    policy = trainer.model
    prompts = _prompts(kind)

    # Our encoding: each distinct prompt once, shared by its group; the same ids as TRL's processor.
    tokenizer = processor.tokenizer
    vision.attach_processor(tokenizer, processor)
    ours_ids, ours_inputs = vision.encode_image_prompts(tokenizer, prompts[::2])
    vision.encode_images(policy, ours_inputs)  # our path: the tower once per prompt, TRL's: the pixels every time
    assert all(x.encoded is not None for x in ours_inputs)
    sequences = [ids for ids in ours_ids for _ in range(2)]
    inputs = [x for x in ours_inputs for _ in range(2)]
    prompt_ids, prompt_mask = left_pad(sequences, tokenizer.pad_token_id)

    g = torch.Generator().manual_seed(1)
    completion_ids = torch.randint(3, 40, (6, 7), generator=g)  # characters only, never an image token
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 5:] = completion_mask[3, 2:] = completion_mask[5, 6:] = 0
    completion_ids[completion_mask == 0] = tokenizer.pad_token_id
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, [""] * 6, torch.zeros(6, dtype=torch.bool),
                      0, model_inputs=inputs)
    trl_fields, trl_prompt_ids, trl_prompt_mask = _trl_forward_fields(processor, prompts, completion_ids.size(1))
    assert torch.equal(trl_prompt_ids, prompt_ids) and torch.equal(trl_prompt_mask, prompt_mask)
    assert inputs[0] is inputs[1], "a group's sequences share their prompt's processed images"

    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    keep = completion_ids.size(1)

    def ours_logps(rows: slice, **kwargs):
        return sequence_logprobs(policy, input_ids[rows], attention_mask[rows], keep, TEMPERATURE, chunk_size=5,
                                 model_inputs=rollout.forward_inputs(rows, prompt_ids.size(1), keep), **kwargs)

    with torch.no_grad():
        current = torch.cat([ours_logps(mb)[0] for mb in MICRO_BATCHES])
        with policy.disable_adapter():
            ref = torch.cat([ours_logps(mb)[0] for mb in MICRO_BATCHES])
    old = current + 0.3 * torch.randn(current.shape, generator=g)
    advantages = torch.randn(6, generator=g)

    trainer.loss_type, trainer.beta = loss_type, beta
    policy.zero_grad(set_to_none=True)
    trl_losses = []
    for mb in MICRO_BATCHES:
        batch = {"prompt_ids": prompt_ids[mb], "prompt_mask": prompt_mask[mb], "completion_ids": completion_ids[mb],
                 "completion_mask": completion_mask[mb], "advantages": advantages[mb],
                 "ref_per_token_logps": ref[mb], "num_items_in_batch": completion_mask.sum(),
                 **_slice_fields(trl_fields, mb)}
        if old_given:
            batch["old_per_token_logps"] = old[mb]
        loss = trainer._compute_loss(policy, batch)
        loss.backward()
        trl_losses.append(loss.item())
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}

    policy.zero_grad(set_to_none=True)
    our_losses = []
    for mb in MICRO_BATCHES:
        logps, entropies = ours_logps(mb, compute_entropy=True)
        objective = Objective(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                              max_completion_length=8)
        loss, _ = grpo_loss(logps, old[mb] if old_given else None, ref[mb], advantages[mb], completion_mask[mb],
                            objective, num_sequences_in_step=6, num_tokens_in_step=float(completion_mask.sum()),
                            num_micro_batches=2, entropies=entropies)
        loss.backward()
        our_losses.append(loss.item())
    our_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}

    assert our_losses == pytest.approx(trl_losses, abs=1e-5)
    assert trl_grads and not any("visual" in n or "vision" in n for n in trl_grads), "LoRA on the language model only"
    for name, trl_grad in trl_grads.items():
        assert trl_grad.abs().max() > 0, f"{name}: TRL's gradient is zero, the comparison would be vacuous"
        torch.testing.assert_close(our_grads[name], trl_grad, rtol=0, atol=1e-5, msg=f"gradient of {name}")
    # The images matter: a blank image of the same size gives other log-probs.
    with torch.no_grad():
        size = IMAGE_SIZES[kind]
        blank = vision.with_images(vision.image_prompt("what colour?", 1), [Image.new("RGB", (size, size), "white")])
        blank_ids, blank_inputs = vision.encode_image_prompts(tokenizer, [blank])
        assert blank_ids[0] == sequences[0]
        other = dataclasses.replace(rollout, model_inputs=blank_inputs * 6)
        changed = sequence_logprobs(policy, input_ids[:1], attention_mask[:1], keep, TEMPERATURE,
                                    model_inputs=other.forward_inputs([0], prompt_ids.size(1), keep))[0]
        assert (changed - current[:1]).abs().max() > 1e-4


# --- generation and training, 4-bit, through load_policy ------------------------------------------


def _train_config(path, **overrides):
    return load_config(overrides={"model_name_or_path": str(path), "dtype": "float32", "lora_r": 4, "lora_alpha": 8,
                                  "lora_dropout": 0.0, **overrides})


def test_generation_with_chunks_equals_without_and_processes_each_prompt_once(vlm, monkeypatch):
    from lowvram_grpo.model import load_policy

    kind, path, _ = vlm
    torch.manual_seed(0)
    policy, tokenizer = load_policy(_train_config(path), torch.device("cpu"))
    with torch.no_grad():  # a random adapter, so that generation runs through LoRA too
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    prompts = _prompts(kind)[::2]
    image_processor = type(vision.processor_of(tokenizer).image_processor)
    calls = []
    original = image_processor.__call__
    monkeypatch.setattr(image_processor, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    inner = policy.get_base_model().model
    tower = getattr(inner, "visual", None) or inner.vision_tower
    encoded = []
    hook = tower.register_forward_hook(lambda *args: encoded.append(1))
    kwargs = dict(num_generations=2, max_prompt_length=8, max_completion_length=6, do_sample=False)
    try:
        whole = generate_rollouts(policy, tokenizer, prompts, chunk_size=6, **kwargs)
    finally:
        hook.remove()
    assert len(calls) == len(prompts), "each prompt's images are processed once, not once per completion"
    assert len(encoded) == len(prompts), "the vision tower runs once per prompt, not once per completion"
    # ...and its features, reused by every later forward, give the log-probs the pixels give.
    width, keep = whole.prompt_ids.size(1), whole.completion_ids.size(1)
    ids = torch.cat([whole.prompt_ids, whole.completion_ids], 1)
    mask = torch.cat([whole.prompt_mask, whole.completion_mask], 1)
    pixels = dataclasses.replace(whole, model_inputs=[dataclasses.replace(x, encoded=None) for x in whole.model_inputs])
    with torch.no_grad():
        reused = sequence_logprobs(policy, ids, mask, keep, model_inputs=whole.forward_inputs(slice(None), width, keep))[0]
        recomputed = sequence_logprobs(policy, ids, mask, keep, model_inputs=pixels.forward_inputs(slice(None), width,
                                                                                                   keep))[0]
    assert "mm_encoder_outputs" in whole.forward_inputs([0], width) and "pixel_values" in pixels.forward_inputs([0], width)
    torch.testing.assert_close(reused, recomputed, atol=1e-5, rtol=0)
    chunked = generate_rollouts(policy, tokenizer, prompts, chunk_size=4, **kwargs)
    assert torch.equal(whole.completion_ids, chunked.completion_ids) and whole.completions == chunked.completions
    # Image prompts are never cut to max_prompt_length (8 here): their image tokens must stay whole.
    assert whole.prompt_mask.sum(1).min() > 8 and whole.num_prompts_truncated == 0
    image_ids = vision.image_token_ids(policy.get_base_model().config)
    assert not torch.isin(whole.completion_ids, torch.tensor(image_ids)).any(), "image tokens are never sampled"
    # The images steer generation: the three prompts' greedy completions are not all the same.
    assert len({tuple(ids) for ids in whole.completion_ids.tolist()}) > 1


def colour_reward(completions, images, **kwargs):
    """Rewards completions that contain the digit of the image's colour (0 red, 1 green, 2 blue)."""
    from lowvram_grpo.rewards import completion_text

    digits = [str(max(range(3), key=lambda c: img[0].getpixel((1, 1))[c])) for img in images]
    return [float(d in completion_text(c)) + 0.1 * len(set(completion_text(c))) for c, d in zip(completions, digits)]


def test_4bit_training_with_images_resumes_exactly(vlm, tmp_path):
    from safetensors.torch import load_file

    from lowvram_grpo.trainer import train

    kind, path, _ = vlm
    size = IMAGE_SIZES[kind]
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (size, size), colour).save(tmp_path / f"{i}.png")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "colour?", "image": f"{i}.png"}) for i in range(3)))
    config = _train_config(path, dataset=str(data), answer_column=None, rewards=[f"{__file__}:colour_reward"],
                           num_generations=3, prompts_per_step=2, generation_chunk_size=4, micro_batch_size=4,
                           max_prompt_length=32, max_completion_length=4, learning_rate=1e-2, max_steps=2,
                           save_every=1, keep_checkpoints=0, log_completions_every=100, output_dir=str(tmp_path / "run"))
    records = []
    train(config, progress=False, on_step=records.append)
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] == r["loss"] for r in records)
    run = tmp_path / "run"
    first = load_file(str(run / "checkpoint-000001" / "adapter_model.safetensors"))
    final = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("lora_B" in k and not torch.equal(first[k], final[k]) for k in first), "LoRA weights did not move"
    assert not any("visual" in k or "vision" in k for k in final), "the adapter holds the language model's LoRA only"
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert samples and samples[0]["prompt"][0]["content"][0] == {"type": "image"}  # logged as placeholders...
    assert samples[0]["images"][0].startswith("data:image/png;base64,")  # ...with thumbnails for the app

    assert_step_two_resumes_exactly(config, run, records, final)


# --- the offline vision demo ---------------------------------------------------------------------


def test_the_demo_models_answers_depend_on_the_picture(tiny_cache):
    """builtin:tiny-vision, as the tiny-cpu-vision preset loads it (4-bit, LoRA), counts the
    squares from the pictures: greedy answers are mostly right with them, and with the pictures
    blanked (the same rows otherwise) they are all the same answer, whatever the count. So the
    reward depends on the image; bench/vision_demo.py shows GRPO then climbing only with them."""
    from lowvram_grpo.data import load_prompt_data
    from lowvram_grpo.model import load_policy
    from lowvram_grpo.rewards.builtins import exact_answer
    from lowvram_grpo.rollout import generate_greedy

    config = load_config(preset="tiny-cpu-vision")
    policy, tokenizer = load_policy(config, torch.device("cpu"))
    accuracy, answers = {}, {}
    for dataset in ("builtin:squares", "builtin:squares-blank"):
        rows = load_prompt_data(dataclasses.replace(config, dataset=dataset), tokenizer).train[:48]
        completions = generate_greedy(policy, tokenizer, [vision.model_prompt(r) for r in rows], max_new_tokens=3,
                                      max_prompt_length=config.max_prompt_length, chunk_size=48).completions
        scores = exact_answer(None, completions, answer=[r["answer"] for r in rows])
        accuracy[dataset], answers[dataset] = sum(scores) / len(scores), set(completions)
    assert len({r["answer"] for r in rows}) == 4, "every count appears"
    assert accuracy["builtin:squares"] >= 0.7, accuracy
    assert len(answers["builtin:squares-blank"]) == 1, answers


# --- the planner ---------------------------------------------------------------------------------


def test_the_planner_counts_the_vision_tower_and_tokens_the_processor_makes(vlm):
    """`plan`'s image terms for each tiny model: its vision tower's parameters are those of the
    loaded model's tower and projector, and the vision tokens per image are what the model's own
    processor puts into the prompt for an image of the planned size."""
    from transformers import AutoModelForImageTextToText

    from lowvram_grpo.planning.memory import estimate_memory
    from lowvram_grpo.planning.vision_memory import vision_shape

    kind, path, processor = vlm
    model_config = json.loads((path / "config.json").read_text())
    size = IMAGE_SIZES[kind]
    shape = vision_shape(model_config, size)
    model = AutoModelForImageTextToText.from_pretrained(path)
    language = {id(p) for p in model.get_decoder().parameters()} | {id(p) for p in model.lm_head.parameters()}
    assert shape.tower_params == sum(p.numel() for p in model.parameters() if id(p) not in language)

    vision.attach_processor(processor.tokenizer, processor)
    ids, _ = vision.encode_image_prompts(processor.tokenizer, [vision.with_images(
        vision.image_prompt("q", 1), [Image.new("RGB", (size, size))])])
    image_token = vision.image_token_ids(model.config)[0]
    assert ids[0].count(image_token) == shape.tokens

    config = load_config(overrides={"model_name_or_path": str(path), "image_size": size, "max_prompt_length": 64,
                                    "max_completion_length": 16, "generation_chunk_size": 8, "micro_batch_size": 8})
    estimate = estimate_memory(model_config, config)
    tower = next(v for k, v in estimate.parts.items() if k.startswith("16-bit vision tower"))
    assert tower == shape.tower_params * 2
    assert any(f"{shape.tokens} vision tokens per {size}x{size} image" in note for note in estimate.notes)
    assert any("vision tower, one layer (one prompt's image" in part for part in estimate.phases["generation"])


def test_the_use_tab_and_the_workbench_take_images(tiny_cache, tmp_path):
    """Try-it (the Use tab) shows an uploaded picture to the model before the prompt, and the
    workbench samples the base model on an image dataset's first rows with their pictures."""
    from lowvram_grpo.app.try_rewards import BaseSampler
    from lowvram_grpo.app.use_adapter import AdapterTryIt
    from lowvram_grpo.builtin.squares import PROMPT, squares_image
    from lowvram_grpo.config import save_config
    from lowvram_grpo.model import load_policy

    config = load_config(preset="tiny-cpu-vision", overrides={"output_dir": str(tmp_path / "run")})
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_config(config, run / "config.yaml")
    policy, _ = load_policy(config, torch.device("cpu"))
    policy.save_pretrained(run / "final")  # an untrained adapter: the tuned answer is the base's
    del policy
    playground = AdapterTryIt()
    answers = {cells: playground.generate(run, run / "final", PROMPT, 3, image=squares_image(list(range(cells))))
               for cells in (1, 3)}
    assert answers == {1: ("1", "1"), 3: ("3", "3")}

    groups = BaseSampler(playground.models).sample(dataclasses.replace(config, num_generations=4), 2)
    assert groups.num_rows == 2 and len(groups.table) == 8
    assert all(row[1] == PROMPT for row in groups.table)  # the shown prompt; the picture went to the model
