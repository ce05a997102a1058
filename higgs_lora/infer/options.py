"""Command-line options shared by the batch CLI (`infer`) and the server (`serve`): model, adapters, sampling.

May import config and the inference core; nothing of the faces that use it.
"""

from __future__ import annotations

import argparse

from higgs_lora.infer.sampling import SamplingParams


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --seed, --max-seconds, --context-pieces, --context-positions with the
    SamplingParams defaults."""
    defaults = SamplingParams()
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--seed", type=int, default=0, help="seed of sample 0 (sample i uses seed + i)")
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="per piece of text")
    parser.add_argument(
        "--context-pieces",
        type=int,
        default=defaults.context_pieces,
        help="long texts: earlier pieces (text + audio) each piece sees after the reference; 0 = the reference alone",
    )
    parser.add_argument(
        "--context-positions",
        type=int,
        default=defaults.context_positions,
        help="long texts: most positions of a piece's prompt; the oldest earlier pieces are dropped first to fit",
    )


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_seconds=args.max_seconds,
        context_pieces=args.context_pieces,
        context_positions=args.context_positions,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="merged model or base directory (transformers layout), or an adapter "
        "directory written by training (its base is read from its config)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="LoRA adapter on top of --model (repeatable; NAME defaults to the directory name)",
    )
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--max-batch", type=int, default=8, help="requests generated together")
    parser.add_argument(
        "--warm-up-positions",
        type=int,
        default=0,
        metavar="N",
        help="compile the decode step at start-up for every batch bucket up to --max-batch and every cache bucket "
        "(256, 512, ... slots) up to N positions of prompt + audio columns (0 = compile each bucket at its first "
        "request; only where the step is compiled: on a GPU)",
    )
    parser.add_argument(
        "--scene",
        default=None,
        help="prompt scene for requests that name none ('' no scene, 'none' no system turn; default: the scene "
        "recorded with the adapter or merged model, else Boson AI's quiet-room scene)",
    )


def parse_adapters(given: list[str]) -> dict[str, str]:
    """{name: dir} from NAME=DIR or DIR arguments. DIR may be an adapter directory, a run's `best/`, or a run folder
    (its final adapter/); which adapter was taken is logged. NAME defaults to the run's name (`runs/x` and
    `runs/x/adapter` -> "x", `runs/x/best` -> "x-best")."""
    from higgs_lora.logs import get_logger
    from higgs_lora.run_folder import ADAPTER, BEST, resolve_adapter

    adapters = {}
    for item in given:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        resolved, how = resolve_adapter(path)
        if resolved.name == ADAPTER:
            default = resolved.parent.name
        elif resolved.name == BEST:
            default = f"{resolved.parent.name}-{BEST}"
        else:
            default = resolved.name
        adapters[name or default] = str(resolved)
        get_logger("infer").info(f"adapter {name or default!r}: {how}")
    return adapters


def load_cloner(args):
    """The `VoiceCloner` the model options name; InferenceError (a UserError) when they name none."""
    from higgs_lora.infer.cloner import InferenceError, VoiceCloner

    adapters = parse_adapters(args.adapter)
    model = args.model or (next(iter(adapters.values())) if adapters else None)
    if model is None:
        raise InferenceError("give --model DIR (a merged model or base) and/or --adapter DIR")
    if args.model is None:
        adapters = {}
    if args.warm_up_positions < 0:
        raise InferenceError(f"--warm-up-positions {args.warm_up_positions}: give 0 (no warm-up) or more positions")
    cloner = VoiceCloner.load(model, adapters=adapters, device=args.device, dtype=args.dtype, max_batch=args.max_batch)
    if args.warm_up_positions:
        from higgs_lora.logs import get_logger

        log = get_logger("infer")
        warmed = cloner.warm_up(args.warm_up_positions)
        if warmed:
            log.info(f"decode step compiled for {len(warmed)} (batch, cache slots) buckets: {warmed}")
        else:
            log.info("--warm-up-positions: nothing to warm, the decode step is not compiled on this device")
    if args.scene is not None:
        cloner.use_scene(args.scene)
    return cloner
