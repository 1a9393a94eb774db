"""What the launchers share: the mfjax command they start, and running (or only printing) commands.

Standard library only: the launchers run on a laptop or a login node that need not have JAX.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MFJAX_COMMANDS = ("train", "sweep", "eval", "segment", "pretrain")
# Where each command keeps its run(s): what the launcher resumes from and checks at the end.
RUN_FOLDER_FLAGS = {"train": "--workdir", "eval": "--workdir", "sweep": "--runs-dir", "segment": "--workdir",
                    "pretrain": "--workdir"}
# How a launcher tells a finished command from a stopped one. A preempted `mfjax train` or
# `mfjax sweep` saves a checkpoint and exits 0, so exit 0 alone does not mean done: a finished
# train (segment, pretrain) run leaves WORKDIR/result.json; a finished sweep has no run left in
# `mfjax sweep ... --list`. eval and `segment --predict` are judged by their exit status.
DONE_FILES = {"train": "result.json", "segment": "result.json", "pretrain": "result.json"}
# mfjax's exit status when another job trains in the workdir (its lock.json): starting again would not help.
WORKDIR_BUSY = 75
# mfjax's exit status for a mistake its one-line error names (a config key, a data file, a usage error):
# starting again would fail the same way.
INPUT_ERROR = 2


class LaunchError(Exception):
  """A bad flag, a missing tool or a failed step; the message says which one and what to do."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the module docstring's layout and shows each flag's default (or that it is required)."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.required:
      return text + " (required)"
    if action.option_strings and action.default is not None and action.default is not argparse.SUPPRESS:
      return text + " (default: %(default)s)"
    return text


def mfjax_command(args: list[str]) -> tuple[list[str], str]:
  """The mfjax arguments given after `--` and the folder of the run(s) (--workdir, or --runs-dir
  for a sweep); clear errors otherwise."""
  if args and args[0] == "--":
    args = args[1:]
  example = "-- train --config configs/paper.py:model=...,dataset=... --workdir DIR"
  if not args:
    raise LaunchError(f"no mfjax command given: put it after the launcher's flags, e.g. {example}")
  if args[0] not in MFJAX_COMMANDS:
    raise LaunchError(f"unknown mfjax command {args[0]!r}; valid: {', '.join(MFJAX_COMMANDS)} (e.g. {example})")
  flag = RUN_FOLDER_FLAGS[args[0]]
  folder = None
  for i, arg in enumerate(args):
    if arg == flag and i + 1 < len(args):
      folder = args[i + 1]
    elif arg.startswith(flag + "="):
      folder = arg.split("=", 1)[1]
  if not folder:
    raise LaunchError(f"the mfjax {args[0]} command has no {flag}: the launcher needs it to resume and to "
                      f"find the result (e.g. {example})")
  if args[0] == "sweep" and any(a in ("--list", "--select-only") for a in args):
    raise LaunchError("launch `mfjax sweep` without --list or --select-only: those only print or select, run "
                      "them where the runs dir is")
  return args, folder.rstrip("/")


def done_file(command: list[str], folder: str) -> str | None:
  """The file a finished run leaves; None where the exit status says it all: `segment --predict`, and
  `segment --import-nnunet`, which writes fold_F/ subfolders of several folds (no result.json of its own)."""
  if any(a == flag or a.startswith(flag + "=") for a in command for flag in ("--predict", "--import-nnunet")):
    return None
  name = DONE_FILES.get(command[0])
  return f"{folder}/{name}" if name else None


def resumes_from(command: list[str], folder: str) -> str:
  return f"the unfinished runs in {folder}" if command[0] == "sweep" else f"{folder}/checkpoints"


def unfinished_listing(command: list[str]) -> list[str] | None:
  """For a sweep: the mfjax arguments that print its unfinished runs (nothing once it is done)."""
  return [*command, "--list"] if command[0] == "sweep" else None


def shell_line(argv: list[str], env: dict | None = None) -> str:
  """The command as one line a shell runs exactly: `K=V ... prog 'arg with spaces'`."""
  prefix = [f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items()]
  return " ".join(prefix + [shlex.quote(str(a)) for a in argv])


SCRIPT_END = "MFJAX_SCRIPT"


def display(argv: list[str], env: dict | None = None) -> str:
  """shell_line, except that a multi-line argument (a remote script) is shown as a quoted
  here-document, verbatim: still exactly the command, and readable."""
  words = []
  for arg in argv:
    arg = str(arg)
    if "\n" not in arg:
      words.append(shlex.quote(arg))
      continue
    flag, eq, script = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    words.append(f"{flag}{eq}\"$(cat <<'{SCRIPT_END}'\n{script}\n{SCRIPT_END}\n)\"")
  return shell_line([], env) + (" " if env else "") + " ".join(words)


class Runner:
  """Runs commands, printing each one first; with dry_run it only prints them."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def say(self, line: str) -> None:
    print(line, file=self.out, flush=True)

  def note(self, text: str) -> None:
    for line in text.splitlines():
      self.say(f"# {line}")

  def require(self, tool: str, hint: str) -> None:
    """In real mode, stop before doing anything if `tool` cannot be run."""
    if not self.dry_run and shutil.which(tool) is None:
      raise LaunchError(f"{tool} not found{' on PATH' if os.sep not in tool else ''}: {hint}")

  def run(self, argv: list[str], env: dict | None = None, check: bool = True, capture: bool = False,
          quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet or self.dry_run:
      self.say(display(argv, env))
    if self.dry_run:
      return subprocess.CompletedProcess(argv, 0, stdout="", stderr="")
    result = subprocess.run(argv, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    if check and result.returncode != 0:
      detail = f": {result.stderr.strip()[-2000:]}" if capture and result.stderr else ""
      raise LaunchError(f"command failed with exit status {result.returncode}: {shell_line(argv)}{detail}")
    return result

  def start(self, argv: list[str], env: dict | None = None, **popen_args) -> subprocess.Popen | None:
    self.say(display(argv, env))
    if self.dry_run:
      return None
    return subprocess.Popen(argv, env={**os.environ, **(env or {})}, **popen_args)


def key_value(text: str) -> tuple[str, str]:
  """argparse type for K=V flags."""
  key, eq, value = text.partition("=")
  if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
    raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with KEY a variable name (letters, digits, _)")
  return key, value
