"""``python -m b3stream.train``: the entry point for launchers.

    deepspeed --module b3stream.train --config X.yaml --deepspeed ds_configs/zero2.json
    torchrun --nproc_per_node 2 -m b3stream.train --config X.yaml [key=value ...]

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK (``deepspeed`` also appends ``--local_rank=N``, accepted
and ignored in favour of the environment). Trailing ``key=value`` arguments override the YAML config
(``max_steps=20 student.lora.r=16``). The process ends through ``distributed.finish``: process group
destroyed, then ``os._exit``, which keeps gloo from aborting at interpreter exit.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m b3stream.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (TrainConfig)")
    p.add_argument("--deepspeed", default=None, help="ZeRO JSON (overrides the config's `deepspeed`)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (model loading, steps)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..config import ConfigError, TrainConfig, load_config
    from ..data.manifest import DataError
    from ..schedule import ScheduleError
    from ..dist import finish
    from .interrupt import Interrupted

    args = parse_args(argv)
    code = 0
    try:
        overrides = list(args.overrides) + ([f"deepspeed={args.deepspeed}"] if args.deepspeed else [])
        cfg = load_config(TrainConfig, args.config, overrides)
        if args.quiet:
            from ..encoder import quiet_model_loading

            quiet_model_loading()
        from .loop import train

        train(cfg, progress=not args.quiet)
    except Interrupted as e:  # SIGINT / SIGTERM: every rank wrote its share of the checkpoint; rank 0 says so
        if os.environ.get("RANK", "0") == "0":
            print(f"b3stream train: {e}", file=sys.stderr, flush=True)
        code = e.code
    except (ConfigError, DataError, ScheduleError) as e:
        print(f"b3stream train: error: {e}", file=sys.stderr)
        code = 2
    except Exception:  # noqa: BLE001 - report, then still leave through finish()
        traceback.print_exc()
        code = 1
    finish(code)
    return code


if __name__ == "__main__":
    main()
