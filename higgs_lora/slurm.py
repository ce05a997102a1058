"""`slurm/submit`: check what a batch script asks of a partition before `sbatch`, and say what to change.

    slurm/submit [--check] [sbatch options] SCRIPT [script arguments]

The scripts' #SBATCH defaults are for GPU nodes (train.sbatch: 8 GPUs x 8 CPUs per task on each node). On a smaller
or CPU-only partition that request either fails at submission ("Invalid generic resource (gres) specification",
"Requested node configuration is not available") or is accepted and pends for ever (Reason=PartitionConfig,
PartitionTimeLimit, PartitionNodeLimit), with nothing that says which flag to change. Nothing inside a script can
check this: sbatch reads the #SBATCH lines before the script runs, and a job that never starts runs nothing. So
this wrapper does what sbatch will do: it reads the script's #SBATCH lines, lays the command line's options over
them (as sbatch does: command line over SBATCH_* variables over #SBATCH lines), asks `sinfo` what the partition's
nodes have (CPUs, GPUs, time limit, how many) and compares. A request that fits is handed to `sbatch` unchanged
(`exec`, same arguments); one that does not is refused with exit 2, every problem listed with the flag that fixes
it, the partitions that would fit, and the command to run instead. `--check` only checks. Where `sinfo` cannot
answer, it says so and submits as is.

Only the standard library: it runs on a login node, with or without the checkout's virtual environment.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VALUE_OPTIONS = {
    "-N": "nodes",
    "--nodes": "nodes",
    "-n": "ntasks",
    "--ntasks": "ntasks",
    "--ntasks-per-node": "ntasks-per-node",
    "-c": "cpus-per-task",
    "--cpus-per-task": "cpus-per-task",
    "-G": "gpus",
    "--gpus": "gpus",
    "--gpus-per-node": "gpus-per-node",
    "--gpus-per-task": "gpus-per-task",
    "--gres": "gres",
    "-p": "partition",
    "--partition": "partition",
    "-t": "time",
    "--time": "time",
}
"""The sbatch options that decide whether a partition can run the job, by every name sbatch accepts."""
ENVIRONMENT = {
    "SBATCH_PARTITION": "partition",
    "SBATCH_TIMELIMIT": "time",
    "SBATCH_GPUS": "gpus",
    "SBATCH_GPUS_PER_NODE": "gpus-per-node",
    "SBATCH_GPUS_PER_TASK": "gpus-per-task",
    "SBATCH_GRES": "gres",
}
"""sbatch's input variables for the same options: they beat #SBATCH lines and lose to the command line."""


class RequestError(ValueError):
    """A command line this wrapper cannot read (no script, a value it cannot parse); the message says which."""


@dataclass(frozen=True)
class Request:
    """What one job (or one task of an array) asks for, per node."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_node: int
    minutes: float | None
    """The time limit; None when the job gives none (the partition's default applies)."""
    partition: str | None
    """None: the cluster's default partition."""


@dataclass(frozen=True)
class NodeGroup:
    """A line of `sinfo --exact`: `count` nodes of one partition with the same CPUs and GPUs."""

    partition: str
    default: bool
    up: bool
    minutes: float | None
    """The partition's time limit (MaxTime); None: no limit."""
    count: int
    cpus: int
    gpus: int


# ------------------------------------------------------------------------------------------- reading the request


def script_options(text: str) -> list[str]:
    """The options of a batch script's #SBATCH lines, in order; like sbatch, stops at the first command."""
    options: list[str] = []
    for line in text.splitlines()[1:] if text.startswith("#!") else text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not stripped.startswith("#SBATCH")):
            continue
        if not stripped.startswith("#SBATCH"):
            break
        options.extend(shlex.split(stripped[len("#SBATCH") :], comments=True))
    return options


def split_command_line(argv: list[str]) -> tuple[list[str], Path, list[str]]:
    """(sbatch options, script, script arguments). The script is the first argument that is no known option's value
    and names a file starting with `#!` (sbatch demands that line), so that `--output old.log` is not taken for it."""
    for position, arg in enumerate(argv):
        if arg.startswith("-") or (position and argv[position - 1] in VALUE_OPTIONS):
            continue
        if _is_script(Path(arg)):
            return argv[:position], Path(arg), argv[position + 1 :]
    raise RequestError("no batch script among the arguments: slurm/submit [sbatch options] SCRIPT [arguments]")


def _is_script(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"#!"
    except OSError:
        return False


def _option_at(options: list[str], position: int) -> tuple[str | None, int]:
    """(canonical name of the VALUE_OPTION at `position`, or None; how many arguments it takes: 1 or 2)."""
    arg = options[position]
    if arg.startswith("--"):
        name, has_value, _ = arg.partition("=")
        return VALUE_OPTIONS.get(name), 1 if has_value or name not in VALUE_OPTIONS else 2
    if arg[:2] in VALUE_OPTIONS:
        return VALUE_OPTIONS[arg[:2]], 1 if len(arg) > 2 else 2  # -N2 or -N 2
    return None, 1


def option_values(options: list[str]) -> dict[str, str]:
    """{canonical name: last value} of the VALUE_OPTIONS in `options` (`--opt=v`, `--opt v`, `-Nv`, `-N v`)."""
    values: dict[str, str] = {}
    position = 0
    while position < len(options):
        name, width = _option_at(options, position)
        if name is not None:
            if position + width > len(options):
                raise RequestError(f"{options[position]} needs a value")
            arg = options[position]
            values[name] = options[position + 1] if width == 2 else arg.partition("=")[2] if "=" in arg else arg[2:]
        position += width
    return values


def without(options: list[str], names: set[str]) -> list[str]:
    """`options` less the VALUE_OPTIONS of canonical `names` (in any spelling, with their values)."""
    kept, position = [], 0
    while position < len(options):
        name, width = _option_at(options, position)
        if name not in names:
            kept.extend(options[position : position + width])
        position += width
    return kept


def _count(value: str, option: str) -> int:
    """A count as sbatch takes it: '8', 'a100:8' (typed GPUs), '2-4' (a node range: the least is what must fit)."""
    match = re.fullmatch(r"(?:[A-Za-z0-9_.-]+:)?(\d+)(?:-\d+)?", value.strip())
    if not match:
        raise RequestError(f"--{option}={value}: expected a number (or TYPE:NUMBER)")
    return int(match.group(1))


def gres_gpus(gres: str) -> int:
    """GPUs in a GRES string ('gpu:8', 'gpu:a100:4(S:0-1),gpu:v100:2', '(null)'); 0 when none."""
    return sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[A-Za-z0-9_.-]+?)?:(\d+)", gres))


def minutes(value: str) -> float | None:
    """A SLURM time ('30', '30:00', '2:00:00', '1-00:00:00', '2-12', 'infinite') in minutes; None: no limit."""
    value = value.strip().lower()
    if value in ("infinite", "unlimited", "-1"):
        return None
    days, dash, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    try:
        parts = [int(p) for p in rest.split(":")]
        day = int(days)
    except ValueError:
        raise RequestError(f"--time={value}: not a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS)") from None
    if dash:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, mins, secs = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, mins, secs = parts
    else:  # MM or MM:SS
        hours, mins, secs = 0, parts[0], (parts[1] if len(parts) > 1 else 0)
    return day * 1440 + hours * 60 + mins + secs / 60


def request_of(values: dict[str, str]) -> Request:
    """What the options ask for per node; the same arithmetic as sbatch's (tasks x per-task amounts)."""
    nodes = _count(values.get("nodes", "1"), "nodes")
    if "ntasks-per-node" in values:
        tasks = _count(values["ntasks-per-node"], "ntasks-per-node")
    else:
        tasks = math.ceil(_count(values.get("ntasks", "1"), "ntasks") / nodes)
    if "gpus-per-node" in values:
        gpus = _count(values["gpus-per-node"], "gpus-per-node")
    elif "gpus-per-task" in values:
        gpus = _count(values["gpus-per-task"], "gpus-per-task") * tasks
    elif "gpus" in values:
        gpus = math.ceil(_count(values["gpus"], "gpus") / nodes)
    else:
        gpus = gres_gpus(values.get("gres", ""))
    cpus = _count(values.get("cpus-per-task", "1"), "cpus-per-task") * tasks
    time = minutes(values["time"]) if "time" in values else None
    return Request(nodes, tasks, gpus, cpus, time, values.get("partition"))


def read_request(argv: list[str], environ: dict[str, str]) -> tuple[Request, dict[str, str], Path]:
    """The request of `sbatch ARGV`: the script's #SBATCH lines, then SBATCH_* variables, then the command line."""
    options, script, _ = split_command_line(argv)
    values = option_values(script_options(script.read_text(encoding="utf-8", errors="replace")))
    values.update({name: environ[var] for var, name in ENVIRONMENT.items() if environ.get(var)})
    values.update(option_values(options))
    return request_of(values), values, script


# ------------------------------------------------------------------------------------------- the partitions


SINFO_FORMAT = "%P|%a|%l|%D|%c|%G"


def parse_sinfo(text: str) -> list[NodeGroup]:
    """NodeGroups of `sinfo -h -e -o '%P|%a|%l|%D|%c|%G'` (partition, avail, time limit, nodes, CPUs, GRES)."""
    groups = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        name, avail, limit, count, cpus, gres = fields
        groups.append(
            NodeGroup(
                name.rstrip("*"),
                name.endswith("*"),
                avail == "up",
                minutes(limit),
                int(count),
                int(cpus.rstrip("+")),
                gres_gpus(gres),
            )
        )
    return groups


def run_sinfo() -> tuple[list[NodeGroup], str]:
    """(node groups, "") from the cluster's sinfo, or ([], why not)."""
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-e", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return [], f"sinfo failed: {err}"
    if result.returncode != 0:
        return [], f"sinfo failed: {(result.stderr or result.stdout).strip()}"
    groups = parse_sinfo(result.stdout)
    return groups, "" if groups else "sinfo listed no partitions"


# ------------------------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Problem:
    """Something a partition cannot give, and the sbatch options that would make the request fit (may be none)."""

    message: str
    flags: tuple[str, ...] = ()


def _fits(group: NodeGroup, request: Request) -> bool:
    return group.cpus >= request.cpus_per_node and group.gpus >= request.gpus_per_node


def default_partition(groups: list[NodeGroup]) -> str | None:
    return next((g.partition for g in groups if g.default), None)


def partition_problems(name: str, request: Request, values: dict[str, str], groups: list[NodeGroup]) -> list[Problem]:
    """What partition `name` cannot give of `request`; [] when it fits. `values` (the options as given) decide
    which flag to suggest: a per-task GPU script (prepare, infer) gets --gpus-per-task, train --gpus-per-node."""
    names = ", ".join(dict.fromkeys(g.partition + "*" * g.default for g in groups))
    groups = [g for g in groups if g.partition == name]
    if not groups:
        return [Problem(f"there is no partition {name!r}; --partition= one of {names} (* the default)")]
    found = []
    if not all(g.up for g in groups):
        found.append(Problem(f"partition {name} is not up (jobs are refused or pend with Reason=PartitionDown)"))
    most_gpus = max(g.gpus for g in groups)
    most_cpus = max(g.cpus for g in groups)
    per_task = "gpus-per-node" not in values and "gpus-per-task" in values
    tasks = request.tasks_per_node
    if request.gpus_per_node and not most_gpus:
        flag = "--gpus-per-task=0" if per_task else "--gpus-per-node=0"
        found.append(
            Problem(
                f"partition {name} has no GPUs, the job asks for {request.gpus_per_node} per node (sbatch: "
                f'"Invalid generic resource (gres) specification"): {flag} for a CPU run, or a GPU partition',
                (flag,),
            )
        )
    elif request.gpus_per_node > most_gpus:
        flags = (
            (f"--gpus-per-task={max(1, most_gpus // tasks)}",)
            if per_task
            else (f"--gpus-per-node={most_gpus}", f"--ntasks-per-node={most_gpus}")
        )
        found.append(
            Problem(
                f"nodes of {name} have at most {most_gpus} GPUs, the job asks for {request.gpus_per_node} per node: "
                f"{' '.join(flags)}" + ("" if per_task else " (one rank per GPU; more --nodes for as many ranks)"),
                flags,
            )
        )
    if request.cpus_per_node > most_cpus:
        flags = (
            (f"--cpus-per-task={most_cpus // tasks}",)
            if tasks <= most_cpus
            else (f"--ntasks-per-node={most_cpus}", "--cpus-per-task=1")  # train on CPU: fewer ranks per node
        )
        found.append(
            Problem(
                f"nodes of {name} have at most {most_cpus} CPUs, the job asks for {request.cpus_per_node} per node "
                f"({tasks} task(s) x {request.cpus_per_node // tasks}): {' '.join(flags)}",
                flags,
            )
        )
    fitting = sum(g.count for g in groups if _fits(g, request))
    if not found and fitting < request.nodes:
        flag = f"--nodes={max(fitting, 1)}"
        found.append(
            Problem(
                f"{name} has {fitting} node(s) with {request.cpus_per_node} CPUs and {request.gpus_per_node} GPUs, "
                f"the job asks for {request.nodes} (sbatch refuses it, or it pends for ever with "
                f"Reason=PartitionNodeLimit or PartitionConfig): {flag}",
                (flag,),
            )
        )
    limit = groups[0].minutes
    if request.minutes is not None and limit is not None and request.minutes > limit:
        flag = f"--time={_clock(limit)}"
        found.append(
            Problem(
                f"the time limit of {name} is {_clock(limit)}, the job asks for {_clock(request.minutes)} (sbatch "
                f"refuses it, or it pends for ever with Reason=PartitionTimeLimit): {flag}",
                (flag,),
            )
        )
    return found


def check(argv: list[str], environ: dict[str, str], groups: list[NodeGroup]) -> tuple[str, Request, list[Problem]]:
    """(the partition checked, the request, its problems there). A comma list of partitions (`-p a,b`) fits when
    one of them does; the first is the one reported on."""
    request, values, _ = read_request(argv, environ)
    fallback = default_partition(groups)
    names = request.partition.split(",") if request.partition else [fallback] if fallback else []
    if not names:
        return "(none)", request, [Problem("the cluster has no default partition: --partition=NAME")]
    found = [(name, partition_problems(name, request, values, groups)) for name in names]
    name, problems = next((f for f in found if not f[1]), found[0])
    return name, request, problems


def fixed_command(argv: list[str], environ: dict[str, str], groups: list[NodeGroup]) -> list[str] | None:
    """`argv` with the suggested flags put before the script, one problem's at a time and checked again (a fix can
    change the next: fewer GPUs per node means fewer tasks, and fewer CPUs then); None when no flags make it fit."""
    for _ in range(8):
        _, _, found = check(argv, environ, groups)
        if not found:
            return argv
        if not found[0].flags:
            return None
        options, script, arguments = split_command_line(argv)
        replaced = {VALUE_OPTIONS[flag.split("=")[0]] for flag in found[0].flags}
        argv = [*without(options, replaced), *found[0].flags, str(script), *arguments]
    return None


def _clock(mins: float) -> str:
    """Minutes as D-HH:MM:SS (sbatch's own --time form)."""
    total = round(mins * 60)
    days, rest = divmod(total, 86400)
    return f"{days}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def describe(request: Request) -> str:
    time = f"for {_clock(request.minutes)}" if request.minutes is not None else "for the partition's default time"
    return (
        f"{request.nodes} node(s) x {request.tasks_per_node} task(s), {request.gpus_per_node} GPU(s) and "
        f"{request.cpus_per_node} CPU(s) per node, {time}"
    )


def report(argv: list[str], environ: dict[str, str], groups: list[NodeGroup]) -> tuple[bool, str]:
    """(fits, what to print): the problems, the partitions that fit as asked, and the command that would fit."""
    partition, request, found = check(argv, environ, groups)
    _, script, _ = split_command_line(argv)
    if not found:
        return True, f"[submit] {script}: {describe(request)}: fits partition {partition}"
    _, values, _ = read_request(argv, environ)
    others = [
        n for n in dict.fromkeys(g.partition for g in groups) if not partition_problems(n, request, values, groups)
    ]
    lines = [f"error: {script} asks for {describe(request)}; partition {partition} cannot give it:"]
    lines += [f"  - {problem.message}" for problem in found]
    if others:
        lines.append(f"  partitions that fit as asked: {', '.join(others)} (--partition=NAME)")
    fixed = fixed_command(argv, environ, groups)
    if fixed is not None:
        lines.append(f"  this fits {partition}: slurm/submit {shlex.join(fixed)}")
    lines.append(f"  what the partitions have: sinfo -e -o '{SINFO_FORMAT}'")
    return False, "\n".join(lines)


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Exit 2 (nothing submitted) when the request cannot run on its partition; else sbatch's own exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    check_only = bool(argv) and argv[0] == "--check"
    argv = argv[1:] if check_only else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1].strip())
        return 0 if argv else 2
    groups, why = run_sinfo()
    try:
        if groups:
            fits, text = report(argv, environ, groups)
        else:
            split_command_line(argv)
            fits, text = True, f"[submit] cannot check the request ({why}); submitting as is"
    except (RequestError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text, file=sys.stderr)
    if not fits:
        return 2
    if check_only:
        return 0
    os.execvp("sbatch", ["sbatch", *argv])
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    raise SystemExit(main())
