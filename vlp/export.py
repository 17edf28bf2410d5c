"""`python -m vlp.export CHECKPOINT --to {vlp,hf,open_clip,timm} OUT_DIR`: convert a checkpoint.

CHECKPOINT is a run directory, a .safetensors file or a DeepSpeed checkpoint directory (any ZeRO
stage, any world size; consolidated on the CPU, every file read with weights_only=True).

    vlp        model.safetensors (fp32, config in its metadata) + model_config.json + preprocess.json
    hf         transformers CLIPModel / SiglipModel folder with its tokenizer and a model card
               (from_pretrained(OUT_DIR), AutoTokenizer, pipeline("zero-shot-image-classification"))
    open_clip  open_clip_config.json + open_clip_model.safetensors (create_model("local-dir:OUT_DIR"))
    timm       image tower only: model.safetensors + config.json (timm.create_model("local-dir:OUT_DIR", pretrained=True))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("vlp", "hf", "open_clip", "timm")


def export(checkpoint: str | Path, to: str, out_dir: str | Path) -> Path:
    """Convert `checkpoint` to format `to` in `out_dir`; returns the output folder."""
    from vlp.loading import load_state

    cfg, sd = load_state(checkpoint)
    out = Path(out_dir)
    if to == "vlp":
        from vlp.train.checkpoint import export_weights

        export_weights(sd, cfg, _model_name(checkpoint), out)
    elif to == "hf":
        from vlp.interop.hf import export_hf

        export_hf(cfg, sd, out)
    elif to == "open_clip":
        from vlp.interop.open_clip import export_open_clip

        export_open_clip(cfg, sd, out)
    elif to == "timm":
        from vlp.interop.timm import export_timm

        export_timm(cfg, sd, out)
    else:
        raise ValueError(f"unknown format '{to}' (choose from {', '.join(FORMATS)})")
    return out


def _model_name(checkpoint: str | Path) -> str:
    """Preset name recorded with the checkpoint, or 'custom'."""
    import json

    from safetensors import safe_open

    from vlp.loading import resolve_checkpoint

    p = resolve_checkpoint(checkpoint)
    if p.is_dir():
        return json.loads((p / "meta.json").read_text()).get("model_name", "custom")
    with safe_open(str(p), framework="pt") as f:
        return (f.metadata() or {}).get("model_name", "custom")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run dir, .safetensors file or DeepSpeed checkpoint dir")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    from vlp.loading import LOAD_ERRORS

    try:
        out = export(args.checkpoint, args.to, args.out_dir)
    except LOAD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} export of {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
