"""The config of a converted-weights folder (`python -m illume_jax convert ... --dst=DIR`).

Use:      python -m illume_jax train --config=configs/converted.py:runs/qwen2_0p5b --workdir=runs/ft
          python -m illume_jax aot --config=configs/converted.py:runs/illume_plus_3b --topology=v5p:4x4x4
The folder's config.json is the experiment config the conversion wrote: the checkpoint's shapes,
the base config's training sections, and `model_init.weights_from` pointing back at the folder, so
training starts from the converted weights. Override anything with --config.KEY=VALUE as usual.
"""
import ml_collections as mlc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    from illume_jax.convert import weights
    if not arg:
        raise ValueError("configs/converted.py needs the converted folder: --config=configs/converted.py:DIR")
    return weights.read_config(arg)
