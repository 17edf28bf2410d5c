"""`python -m vlp.importer open_clip CKPT --model NAME OUT_DIR`: another library's weights -> vlp checkpoint.

CKPT is an open_clip state dict (.pt/.bin read with weights_only=True, or .safetensors); NAME is a
vlp preset or open_clip model name (e.g. ViT-B-32), or a path to an open_clip model config JSON.
OUT_DIR receives model.safetensors + model_config.json + preprocess.json (load with vlp.load_model).
OpenAI CLIP state dicts (QuickGELU, architecture read off the tensor shapes) convert the same way;
--model is then only used as the name recorded in the export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def import_checkpoint(source: str, checkpoint: str | Path, model: str, out_dir: str | Path) -> Path:
    """Convert `checkpoint` of library `source` into a vlp export folder; returns model.safetensors."""
    from vlp.interop.open_clip import load_open_clip_as_vlp
    from vlp.train.checkpoint import export_weights

    if source not in ("open_clip", "openai"):
        raise ValueError(f"unknown source '{source}' (open_clip, openai)")
    spec: str | dict = model
    if model.endswith(".json") and Path(model).is_file():
        doc = json.loads(Path(model).read_text())
        spec = doc.get("model_cfg", doc)
    clip = load_open_clip_as_vlp(checkpoint, spec)
    sd = {k: v.detach().float() for k, v in clip.state_dict().items()}
    name = model if isinstance(spec, str) else Path(model).stem
    return export_weights(sd, clip.config, name, Path(out_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.importer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["open_clip", "openai"])
    parser.add_argument("checkpoint")
    parser.add_argument("--model", required=True, help="preset / open_clip model name, or a config .json")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    from vlp.loading import LOAD_ERRORS

    try:
        path = import_checkpoint(args.source, args.checkpoint, args.model, args.out_dir)
    except LOAD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
