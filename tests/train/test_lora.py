"""student.lora: a LoRA adapter trained in place of every weight; merged into the checkpoint, saved beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_resume import StopAt, weights, without_times
from tropd_cli.config import LoraConfig, ModelConfig
from tropd_cli.errors import UserError
from tropd_cli.models import apply_lora, load_adapter_into, merge_lora, tiny_random
from tropd_cli.train.loop import StopRequest, train

CPU = torch.device("cpu")


def student_with(lora: int) -> ModelConfig:
    return ModelConfig(
        from_teacher=True, keep_layers=[0, 3], lora=LoraConfig(r=lora, target_modules=["q_proj", "v_proj"])
    )


def test_opd_with_lora_trains_only_the_adapter_and_ships_it_merged(make_config, tmp_path):
    cfg = make_config(student=student_with(4), method={"name": "opd"}, steps=3, optim={"lr": 1e-2})
    result = train(cfg, output_dir=tmp_path / "run")
    final = weights(result.checkpoint)
    assert not any("lora" in k for k in final)  # a plain Hugging Face checkpoint
    # The base weights it started from: the teacher's layers 0 and 3.
    base, _ = tiny_random(ModelConfig(name="tiny-random", tiny_layers=4))
    from tropd_cli.models import drop_layers

    drop_layers(base, [0, 3])
    start = base.state_dict()
    changed = {k for k in final if not torch.equal(final[k], start[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    # base + the saved adapter == the merged checkpoint
    load_adapter_into(base, result.checkpoint / "adapter")
    merged = base.state_dict()
    assert all(torch.allclose(merged[k], final[k], atol=1e-6) for k in final)


def test_a_lora_run_resumes_to_the_same_weights(make_config, tmp_path):
    cfg = lambda **kw: make_config(student=student_with(4), method={"name": "opd"}, steps=4, **kw)  # noqa: E731
    straight = train(cfg(), output_dir=tmp_path / "straight")
    stop = StopRequest()
    out = tmp_path / "resumed"
    first = train(cfg(), output_dir=out, hooks=StopAt(stop, 1), stop=stop)
    assert first.interrupted
    second = train(cfg(resume="auto"), output_dir=out)
    a, b = weights(straight.checkpoint), weights(second.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_times(second.history) == without_times(straight.history)


def test_merge_lora_leaves_a_plain_model_with_the_same_outputs():
    model, _ = tiny_random(ModelConfig(name="tiny-random"))
    apply_lora(model, LoraConfig(r=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    x = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        before = model(x).logits
        merge_lora(model)
        after = model(x).logits
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert torch.allclose(before, after, atol=1e-5)


def test_unknown_target_modules_are_refused_in_one_line():
    model, _ = tiny_random(ModelConfig(name="tiny-random"))
    with pytest.raises(UserError, match="target_modules"):
        apply_lora(model, LoraConfig(r=4, target_modules=["c_attn"]))


def test_adapter_files_are_what_peft_reads(make_config, tmp_path):
    from peft import LoraConfig as PeftLoraConfig

    result = train(make_config(student=student_with(2), method={"name": "opd"}, steps=1), output_dir=tmp_path)
    adapter = Path(result.checkpoint) / "adapter"
    assert PeftLoraConfig.from_pretrained(str(adapter)).r == 2
    assert all(".lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))
