"""Command-line flags made from the config models: one flag per field, its help and default
from the field, and pydantic's errors said of the flags in one line."""

from __future__ import annotations

import argparse
import os
import types
import typing

from pydantic import BaseModel, ValidationError

from distilq.config.shared import default_registry
from distilq.errors import InputError

FLAG_NAMES = {"inputs": "--input", "id_columns": "--id-column"}
METAVARS = {
    "inputs": "PATH",
    "output": "DIR",
    "validation": "SPEC",
    "id_columns": "COL",
    "label_map": "DATA=MODEL,...",
    "validation_rows": "N",
    "mlflow_tracking_uri": "URI",
    "mlflow_model": "NAME",
}


def _flag_type(annotation) -> tuple[type, list | None, bool]:
    """The argparse type, the choices (of a Literal) and whether the flag repeats."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, list(args), False
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Annotated:
        return _flag_type(args[0])
    if origin is list:
        return str, None, True
    if origin is dict:  # given as A=B,C=D; the config parses it
        return str, None, False
    return annotation, None, False


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of `model`, with the field's description as help and its default
    shown. Unset flags stay None, so the config applies its own default."""
    for name, field in model.model_fields.items():
        kind, choices, repeats = _flag_type(field.annotation)
        flag = _flag(name)
        help_text = field.description or ""
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            if default not in (None, False, [], {}):
                shown = ", ".join(default) if isinstance(default, list) else default
                help_text += f" (default {shown})"
        kwargs: dict = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=kind, choices=choices, metavar=METAVARS.get(name))
            if repeats:
                kwargs["action"] = "append"
            if field.is_required():
                kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def _flag(field: str) -> str:
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def config_from(model: type[BaseModel], args: argparse.Namespace):
    """The config from the flags given; a bad value is a usage error, said in one line."""
    fields = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    try:
        return model(**fields)
    except ValidationError as e:
        raise InputError("; ".join(map(_flag_problem, e.errors()))) from None


# What a bounded field's pydantic error means, said of its flag.
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be more than"),
    "less_than_equal": ("le", "must be at most"),
    "less_than": ("lt", "must be less than"),
}


def _flag_problem(error: dict) -> str:
    """One pydantic error as `--batch-size must be at least 1 (got 0)`."""

    def shown(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    ctx = error.get("ctx", {})
    if not error["loc"]:  # a check across fields: its message names the flags
        return str(ctx.get("error", error["msg"]))
    flag = _flag(str(error["loc"][0]))
    if error["type"] in _BOUNDS:
        key, words = _BOUNDS[error["type"]]
        return f"{flag} {words} {shown(ctx[key])} (got {shown(error['input'])})"
    if error["type"] == "literal_error":
        return f"{flag} must be one of {ctx['expected']} (got {error['input']!r})"
    return f"{flag}: {error['msg']}"


def common_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print only the {what} JSON")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the tracebacks of failed steps here too (they are always in the run's "
        "Prefect logs)",
    )


def registry_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        default=default_registry(),
        help="registry directory or fsspec URI (env DISTILQ_REGISTRY; default %(default)s)",
    )


def ref_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref", nargs="?", default="production", help="version or alias (default production)"
    )


def mlflow_args(parser: argparse.ArgumentParser, note: str) -> None:
    for flag, metavar, env, what in (
        ("--mlflow-tracking-uri", "URI", "DISTILQ_MLFLOW_TRACKING_URI", "MLflow tracking server"),
        ("--mlflow-model", "NAME", "DISTILQ_MLFLOW_MODEL", "registered model in MLflow"),
    ):
        default = os.environ.get(env) or None
        parser.add_argument(
            flag, metavar=metavar, default=default, help=f"{what} (env {env}){note}"
        )


def add_flow_command(
    commands, name: str, model: type[BaseModel], summary: str, help: str, what: str
):
    """A command that runs a flow: a flag per field of its config `model`, and `--json`
    (printing the flow's `what` JSON) and `--verbose`."""
    command = commands.add_parser(
        name, help=summary, description=help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(command, model)
    common_flags(command, what)
    return command
