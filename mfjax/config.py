"""Config plumbing: `key=value,...` arguments and early validation with the valid choices listed."""
import ast
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  pass


class RunStopped(RuntimeError):
  """A run that cannot go on, for a reason its message explains to the user (a non-finite loss, a
  corrupt feature cache)."""


class DataError(ValueError):
  """Input data that cannot be used (a corrupt image or volume, a bad CSV row, a dataset folder
  missing files, a bad dataset option); the message names the file, row or option at fault."""


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """'model=dinov2_vitb14,lr=3e-5' -> ConfigDict, typed by the defaults; unknown keys fail."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" not in item:
      raise ConfigError(f"config argument {item!r} is not key=value; valid keys: {sorted(defaults)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    out[key] = _typed(value, defaults[key], key)
  return out


def _typed(value: str, default: Any, key: str):
  if isinstance(default, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"{key}={value!r}: expected true or false")
    return value.lower() in ("true", "1")
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    try:
      number = ast.literal_eval(value) if isinstance(default, int) else float(value)
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f"{key}={value!r}: expected a {type(default).__name__}") from e
    if isinstance(default, int):  # 1e3 is 1000; 2.7, True or a string is a typo, not 2, 1 or an error later
      if isinstance(number, float) and number.is_integer():
        number = int(number)
      if not isinstance(number, int) or isinstance(number, bool):
        raise ConfigError(f"{key}={value!r}: expected an int")
    return number
  if value.lower() in ("none", "null"):
    return None
  return value


def check_choice(what: str, value, valid: Iterable) -> None:
  valid = list(valid)
  if value not in valid:
    raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def to_dict(config) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)
