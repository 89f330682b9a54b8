"""cellssl_jax.demo's stage bookkeeping (skip, --redo, changed arguments, resume), with stub stages: no JAX work."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellssl_jax import demo


@pytest.fixture
def stub_demo(monkeypatch, tmp_path):
    """Replace every stage by a stub that logs its name (and what it found on disk); return (invoke, log, workdir)."""
    calls: list[str] = []
    interrupt_at: set[str] = set()
    seen: dict[str, bool] = {}

    def stub(name):
        def fn(run, *args, **kwargs):
            if name in interrupt_at:
                raise KeyboardInterrupt(name)
            if name in ("train", "lens"):  # what a resuming train_and_evaluate would find
                seen[f"{name}_checkpoint_present"] = (run.dir / name / "checkpoints" / "40").exists()
                (run.dir / name / "checkpoints" / "40").mkdir(parents=True, exist_ok=True)
            calls.append(name)
            return {"title": name}

        return fn

    for name in demo.STAGES:
        monkeypatch.setattr(demo, f"stage_{name}", stub(name))
    import cellssl_jax.report

    monkeypatch.setattr(cellssl_jax.report, "write_report", lambda run_dir: Path(run_dir) / "report.html")
    workdir = tmp_path / "run"

    def invoke(*argv, interrupt: str | None = None) -> list[str]:
        calls.clear()
        interrupt_at.clear()
        if interrupt:
            interrupt_at.add(interrupt)
        try:
            demo.main(["--workdir", str(workdir), *argv])
        except KeyboardInterrupt:
            pass
        return list(calls)

    return invoke, seen, workdir


def test_a_rerun_cut_short_leaves_no_stale_record_of_the_stages_after_it(stub_demo):
    invoke, _, _ = stub_demo
    assert invoke() == list(demo.STAGES)
    assert invoke() == []
    # A new plate, then an interruption in the dataset stage: the next plain run must redo everything after the
    # plate (it used to skip them all on their old records, built from the old plate).
    assert invoke("--redo", "plate", interrupt="dataset") == ["plate"]
    assert invoke() == list(demo.STAGES[1:])


def test_changed_arguments_rerun_the_stage_and_those_after_it(stub_demo):
    invoke, _, workdir = stub_demo
    invoke()
    assert invoke("--seed", "1") == list(demo.STAGES)  # used to skip everything: the plate stayed seed 0
    assert invoke("--seed", "1") == []
    assert invoke("--seed", "1", "--train-override", "total_steps=80") == list(demo.STAGES[3:])
    assert invoke("--seed", "1", "--train-override", "total_steps=80") == []
    import json

    plate = next(s for s in json.loads((workdir / "summary.json").read_text())["stages"] if s["name"] == "plate")
    assert plate["inputs"] == {"seed": 1}


def test_a_training_stage_starts_afresh_when_asked_or_its_inputs_changed_and_resumes_otherwise(stub_demo):
    invoke, seen, workdir = stub_demo
    invoke()
    # --redo train: the finished run's checkpoint is removed first (train_and_evaluate would resume from it and
    # train 0 steps on the old inputs); the lens, built on the demo's ConvAE, starts afresh too.
    assert invoke("--redo", "train") == list(demo.STAGES[3:])
    assert seen == {"train_checkpoint_present": False, "lens_checkpoint_present": False}
    invoke("--redo", "dataset")
    assert seen == {"train_checkpoint_present": False, "lens_checkpoint_present": False}
    # A stage the lens does not read (temporal): the lens reruns from its finished checkpoint (evaluation only).
    assert invoke("--redo", "temporal") == ["temporal", "lens", "compare"]
    assert seen["lens_checkpoint_present"] is True
    # A new plate, interrupted in the features stage: the lens folder, trained on the old plate, is already gone,
    # so the next run cannot resume it.
    assert invoke("--redo", "plate", interrupt="features") == ["plate", "dataset", "crops", "train", "interop"]
    assert not (workdir / "lens").exists()
    assert invoke() == ["features", "temporal", "lens", "compare"]
    assert seen["lens_checkpoint_present"] is False
    # Cut short inside training itself: the next plain run resumes from what it had saved.
    invoke("--redo", "train", interrupt="train")
    (workdir / "train" / "checkpoints" / "40").mkdir(parents=True)  # what the cut-short run had saved
    assert invoke() == list(demo.STAGES[3:])
    assert seen["train_checkpoint_present"] is True


def test_an_unknown_stage_name_in_redo_is_refused(stub_demo):
    invoke, _, _ = stub_demo
    invoke()
    with pytest.raises(SystemExit):
        invoke("--redo", "temporl")
