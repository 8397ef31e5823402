"""``medmeta train``: meta-train a few-shot learner on a protocol's common conditions.

The options are generated from :class:`medmeta.training.TrainConfig`'s fields (name, type,
default and help text), so every setting of a run has exactly one option; ``--config FILE``
reads the same settings from YAML, and options given on the command line override it. This
module only parses: torch and MONAI load inside the command, after the options are read.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from medmeta.cli.common import user_errors
from medmeta.training.checks import PATH_FIELDS, field_types
from medmeta.training.config import ConfigError, TrainConfig, help_text, option_name
from medmeta.training.config_file import parse_key_values

_DEFAULTS = TrainConfig()
# fields whose option is not simply --field-name (see TrainConfig's metadata)
RENAMED_OPTIONS = {"train_shots": "--train-shot", "method_kwargs": "--method-option", "backbone_kwargs": "--backbone-option"}
_FLAGS = {
    "class_conditional": "--class-conditional/--marginal",
    "compile": "--compile/--no-compile",
    "cache_in_memory": "--cache-in-memory/--no-cache-in-memory",
}


def train(ctx: typer.Context, **values: Any) -> None:
    """Meta-train: pre-train the backbone, train on episodes, keep the best model on val classes, calibrate.

    With no options it trains on the synthetic demo set in sample_data/ with the full default
    recipe (20 pre-training epochs, then 3,200 episodes: about half an hour on 2 CPU cores for a
    real protocol; volumes default to 5 epochs and 600 episodes on a conv4 of width 32, about
    7-12 minutes); --config sample_data/demo-budget.yaml is the quick start's small budget.
    The run folder gets config.yaml: the settings of the run, to give back to --config.
    """
    with user_errors():
        config, resume = build_config(ctx, values)
        from medmeta.progress import console

        overwrite = bool(values.get("overwrite"))
        if values.get("nproc", 1) > 1:
            from medmeta.training.launch import launch

            launch(config, values["nproc"], resume=resume, overwrite=overwrite, quiet=console.quiet)
            return
        from medmeta.training import train as run_training

        run_training(config, resume=resume, quiet=console.quiet, overwrite=overwrite)


def build_config(ctx: typer.Context, values: dict[str, Any]) -> tuple[TrainConfig, bool]:
    """The TrainConfig of this command: ``--config``'s file (or the defaults), overridden by the
    options given on the command line; validated (errors name the option or the file's key)."""
    from medmeta.training.config_file import read_config_file

    path, resume = values.get("config"), bool(values.get("resume"))
    from_file = read_config_file(path) if path is not None else {}
    given = {spec.name for spec in fields(TrainConfig) if _given(ctx, spec.name)}
    settings = {**from_file, **{name: _setting(name, values[name]) for name in given}}
    if resume:
        from medmeta.training.resume import check_resume_options

        check_resume_options(settings.get("out", TrainConfig().out), settings)
    config = TrainConfig(**settings)
    try:
        config.validate(resume=resume)
    except ConfigError as exc:
        if exc.field in given:
            raise ConfigError(f"{option_name(exc.field)}: {exc}", exc.field) from None
        if exc.field in from_file:
            raise ConfigError(f"{path}: {exc}", exc.field) from None
        raise
    return config, resume


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option of ``name`` was given (rather than left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _setting(name: str, value: Any) -> Any:
    """A command-line value as the TrainConfig field ``name`` holds it."""
    if name in ("method_kwargs", "backbone_kwargs"):
        return parse_key_values(value or [], option_name(name))
    if name == "train_shots":
        return list(value) if value else None
    if name in PATH_FIELDS and value is not None:
        return str(value)
    return value


# ---- the options, from TrainConfig's fields ---------------------------------------------------
def _option_type(hint: Any) -> Any:
    """The type Typer parses a field's option as: ``X | None`` -> ``Optional[X]``; a mapping
    -> repeatable KEY=VALUE text."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return Optional[list[str]]
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]
    return hint


def _parameter(name: str, hint: Any) -> inspect.Parameter:
    default = getattr(_DEFAULTS, name)
    option_type = _option_type(hint)
    if typing.get_origin(hint) is dict:
        default = None
    if name in PATH_FIELDS:
        option_type = Optional[Path] if default is None else Path
    option = typer.Option(_FLAGS.get(name, option_name(name)), help=help_text(name), show_default=default is not None)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[option_type, option], default=default)


def _signature() -> inspect.Signature:
    hints = field_types()
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [_parameter(spec.name, hints[spec.name]) for spec in fields(TrainConfig)]
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option(
            help="YAML file of these settings (field names as keys, e.g. a run's config.yaml); options given here override it.")],
    ))
    params.append(inspect.Parameter(
        "resume", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[bool, typer.Option(help="Continue the run in --out from its last saved state.")],
    ))
    params.append(inspect.Parameter(
        "nproc", inspect.Parameter.KEYWORD_ONLY, default=1,
        annotation=Annotated[int, typer.Option(
            min=1, help="Train on this many processes (torchrun, DistributedDataParallel): one per GPU, or per share of the CPU cores; see docs/distributed.md.")],
    ))
    params.append(inspect.Parameter(
        "overwrite", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[bool, typer.Option(help="Train from scratch into an --out that already holds a run, replacing it.")],
    ))
    return inspect.Signature(params, return_annotation=None)


train.__signature__ = _signature()  # type: ignore[attr-defined]
