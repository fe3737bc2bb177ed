"""The first stage of a run: everything that can be refused without loading a model, before anything is written.

It returns the settings to run with: the given ones for a new run; for ``--resume`` those saved in ``run.json``,
where every setting the caller names in ``given`` (the flags typed with ``--resume``) must say what the run already
uses, except the thread count, which decides how fast the run computes, not what. The device and the thread count
are decided here once and saved with the settings, so that a resumed run computes the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from .. import parallel
from .directory import RUN_FILE, check_new_run, check_resumable, read_run_file
from .hardware import resolve_device
from .loop import summary_writer_class
from .quantize import QuantizationUnavailable, require_package
from .settings import RunError, RunSettings, as_typed, flag
from .threads import choose_threads
from .words import plural

RESUME_MAY_CHANGE = frozenset({"threads"})  # a float reduction over another thread count rounds differently only


def check_run(
    settings: RunSettings,
    output_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    given: Collection[str] = (),
    log: Callable[[str], Any] = print,
) -> RunSettings:
    """The settings to run with (module docstring), once every check that needs no model has passed.

    Raises:
        RunError: in one line, naming the setting or the directory and what to do.
    """
    if resume:
        chosen = resumed(settings, output_dir, given)
    else:
        check_new_run(output_dir, overwrite)
        chosen = settings
    refuse_what_cannot_run(chosen)
    try:
        device = resolve_device(chosen.device)  # decided once and saved, like the thread count
    except RunError as error:
        if not resume:
            raise
        raise RunError(f"cannot resume {output_dir} here: it trains on {chosen.device} ({error})") from None
    if parallel.get_world_size() > 1 and device != "cpu":
        raise RunError(
            f"--device {chosen.device}: runs of several processes train on the CPU (DDP over gloo); "
            "use --device cpu, or one process"
        )
    threads = chosen.threads
    if threads is None:
        choice = choose_threads()
        threads = choice.threads
        log(f"using {plural(threads, 'torch thread')}: {choice.reason}")
    parallel.barrier()  # every process has checked the directory before rank 0 writes into it
    return chosen.replace(device=device, threads=threads)


def resumed(settings: RunSettings, output_dir: Path, given: Collection[str]) -> RunSettings:
    """The settings saved in the run in ``output_dir`` (with ``settings.threads``, when set), if it can go on.

    Raises:
        RunError: if it is no run of ours that started, a setting in ``given`` differs from the saved one, or the
            run failed, is complete or cannot be written.
    """
    run_file = read_run_file(output_dir)
    try:
        saved = RunSettings.from_dict(run_file["settings"])  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as error:
        raise RunError(f"--resume {output_dir}: {RUN_FILE} cannot be read ({error})") from None
    for name in sorted(set(given) - RESUME_MAY_CHANGE):
        mine, theirs = settings.value(name), saved.value(name)
        if mine != theirs:
            raise RunError(
                f"--resume continues a run with the settings saved in it: {flag(name)} {as_typed(name, mine)} differs "
                f"from the run's {as_typed(name, theirs)}; drop {flag(name)}"
            )
    check_resumable(output_dir, run_file)
    return saved if settings.threads is None else saved.replace(threads=settings.threads)


def refuse_what_cannot_run(settings: RunSettings) -> None:
    """Settings that are valid but that this machine, this launch or ``adalora train`` cannot run."""
    world = parallel.get_world_size()
    if settings.batch_size % world:
        raise RunError(
            f"--batch-size {settings.batch_size} (the global micro-batch) does not split evenly over {world} "
            f"processes; use a multiple of {world}"
        )
    if settings.tensorboard:
        summary_writer_class()
    if settings.adalora.compact_at_final:  # the run would have checkpoints it cannot resume
        raise RunError(
            "--compact-at-final: adalora train cannot resume from a checkpoint of compacted adapters, so it trains "
            "them uncompacted (the saved adapter keeps only the kept triplets either way); drop --compact-at-final"
        )
    if settings.quantize != "none":
        try:
            require_package(settings.quantize)
        except QuantizationUnavailable as error:
            raise RunError(str(error)) from None
