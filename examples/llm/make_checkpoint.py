"""Write a seeded Llama-architecture checkpoint directory (config.json + safetensors), as a hub download would be.

No model hub is reachable from the project's machines, so the weights are transformers' own initialisation of
`LlamaForCausalLM` under a fixed seed: the same seed, config and device kind give the same tensors. `--device
cuda` initialises on the GPU (a 7B model in seconds instead of minutes of CPU). The directory has the
layout `LlamaForCausalLM.from_pretrained` reads (sharded with an index when large), which is what the pipeline
stages load from.

    python examples/llm/make_checkpoint.py --config tiny --out /tmp/llm-tiny
    python examples/llm/make_checkpoint.py --config 7b --out /data/llm-7b --dtype bfloat16 --device cuda  # ~13 GB
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
DTYPES = ("float32", "bfloat16", "float16")


def config_path(name: str) -> Path:
    """`tiny`, `7b`, or a path to a config.json of one's own."""
    path = CONFIGS / f"{name}.json"
    return path if path.is_file() else Path(name)


def make_checkpoint(config_file: Path, out: Path, seed: int, dtype: str, device: str = "cpu") -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**json.loads(config_file.read_text()))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # a 7B model initialised in fp32 would need 27 GB of RAM
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="2GB")
    (out / "seed.json").write_text(json.dumps({"seed": seed, "dtype": dtype, "config": config_file.name,
                                               "device": device}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="tiny, 7b, or a config.json path")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help="where to initialise: cpu, or cuda (much faster for 7b)")
    args = parser.parse_args(argv)
    config_file = config_path(args.config)
    if not config_file.is_file():
        print(f"error: no config '{args.config}' (tiny, 7b, or a config.json path)", file=sys.stderr)
        return 2
    print(make_checkpoint(config_file, args.out, args.seed, args.dtype, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
