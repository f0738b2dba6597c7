"""ds-cl: continual full fine-tuning on DeepSpeed ZeRO-3 with orthogonal SVD subspaces."""

__version__ = "0.1.0"

__all__ = ["SubspaceProjector", "__version__"]


def __getattr__(name):
    # Lazy so that `import ds_cl` (the CLI, the maths) does not import deepspeed.
    if name == "SubspaceProjector":
        from ds_cl.core.projector import SubspaceProjector

        return SubspaceProjector
    raise AttributeError(name)
