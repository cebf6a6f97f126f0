"""Resuming a run: which settings a resumed run may change (load_resume_config), and putting its
folder's last checkpoint back into a Run (resume_run) before `fit(run)` continues it."""
from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import TrainConfig, fact, flag_name, load_config_file, run_settings
from ..data.manifest import check_classes, check_same_data, read_manifest
from ..errors import TrainkitError
from ..loop.optim import SCHEDULERS
from ..models import gated_model_name
from .experiment import canonical, warn_unchecked_data
from .rundir import OWN_NAMES, RunDirectory, RunLock, is_run_config, lock_run

def load_resume_config(run_dir: Path, overrides: dict, trust_code: bool = False) -> TrainConfig:
    """The saved config of a run, checked against flags given again with --resume. A model that is
    code is imported only as models.gated_model_name allows (named again, or `trust_code`, and a
    file unchanged since training)."""
    if not (run_dir / "last.pt").is_file():
        unfinished = (f"; it was stopped before its first epoch ended, so nothing was trained: start it "
                      f"again with --out {run_dir}") if is_run_config(run_dir / "config.json") else ""
        raise TrainkitError(f"{run_dir} holds no checkpoint (last.pt) to resume from{unfinished}")
    saved = run_settings(load_config_file(run_dir / "config.json"))   # one line for a damaged file
    record = json.loads((run_dir / "config.json").read_text())        # its other sections
    if saved.precision == "auto":   # a run from before auto was measured: what it trained in
        autocast = record.get("environment", {}).get("autocast")
        saved = saved.replace(precision="bf16" if autocast == "bfloat16" else "fp32")
    gated_model_name(str(run_dir / "config.json"), saved.model, record.get("model"), trust_code=trust_code,
                     strict_file=True,
                     named=canonical(saved.replace(model=overrides["model"])).model if "model" in overrides else None)
    given = canonical(saved.replace(**overrides))     # paths compared as absolute paths
    if "epochs" in overrides:
        done = ckpt.load_checkpoint(run_dir / "last.pt")["epoch"]
        if overrides["epochs"] < done:
            raise TrainkitError(f"--epochs {overrides['epochs']} is fewer than the {done} epochs {run_dir} has "
                                f"already trained; give more to extend it, or leave --epochs out")
    for name in overrides:      # each setting says what a resume may do with it (config's on_resume)
        rule, changed = fact(name, "on_resume"), getattr(given, name) != getattr(saved, name)
        if rule == "extend" and changed and SCHEDULERS.fact(saved.scheduler, "fixed_length"):
            raise TrainkitError(f"{flag_name(name)} cannot change when resuming a run with --scheduler "
                                f"{saved.scheduler}: its schedule was planned for {getattr(saved, name)} {name}")
        if rule == "fixed" and changed:
            raise TrainkitError(f"{flag_name(name)} {getattr(given, name)} contradicts the run being resumed "
                                f"({getattr(saved, name)}); leave it out to resume with the saved settings")
    return saved.replace(**{k: getattr(given, k) for k in overrides if fact(k, "on_resume") != "fixed"})


def _recorded_class_names(run_dir: Path) -> list:
    """config.json's class names (its data section), which a resume keeps; [] where it has none."""
    try:
        classes = json.loads((run_dir / "config.json").read_text()).get("data", {}).get("classes")
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    return classes if isinstance(classes, list) else []


def predates_manifests(run_dir: Path) -> bool:
    """A run made before data.json: it is resumed on its data as trainkit read it then
    (experiment.get_data's `before_manifests`)."""
    return (run_dir / "last.pt").is_file() and read_manifest(run_dir) is None


def resume_run(run, before_manifests: bool = False) -> RunLock | None:
    """Continue `run` (an assembly.Run) from its folder's last.pt: take the folder (rank 0), check
    that the data is what the run trained on, put the checkpoint's state back (Run.load_state_dict),
    and re-create what a kill after last.pt left missing or stale (RunDirectory.repair). Returns
    the folder's lock, held until the run ends."""
    run_dir, main = run.run_dir, run.rank.is_main
    saved_path = run_dir / "last.pt"
    held = None
    try:
        if main and run_dir.is_dir():   # else load_checkpoint says there is none
            held = lock_run(run_dir)
            ckpt.remove_stale_temporaries(run_dir, OWN_NAMES)
        saved = ckpt.load_checkpoint(saved_path)
        check_same_data(run_dir, run.data.manifest(), ("train", "val", "test"), "--resume")
        if _recorded_class_names(run_dir):         # config.json's, which the resumed run keeps
            check_classes(run_dir, _recorded_class_names(run_dir), "--resume")
        run.load_state_dict(saved, str(saved_path))
        if before_manifests and main:
            warn_unchecked_data(run.cfg)
        folder = run.callback(RunDirectory)
        if folder is not None:
            folder.repair(saved)
            folder.record_config()
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held
