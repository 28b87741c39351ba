"""`python -m augkd.ops`: which backends this machine can run, and why not where it cannot."""

import torch

from . import _extension, backends


def main() -> None:
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device visible: {torch.cuda.is_available()}")
    print(f"extension augkd._C: {'loaded from ' + _extension.PATH if _extension.LOADED else 'NOT loaded: ' + _extension.WHY_NOT_LOADED}")
    if _extension.LOADED:
        print(f"  CUDA kernels compiled in: {_extension.BUILT_WITH_CUDA}")
    print(f"requested backend: {backends.requested()} (AUGKD_BACKEND or use_backend())")
    print()
    print(f"{'backend':8} {'device':6} {'status':11} detail")
    for row in backends.status():
        print(f"{row.name:8} {row.device:6} {'ready' if row.available else 'unavailable':11} {row.detail}")
    for device in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        print(f"auto on {device}: {backends.select(torch.device(device)) if backends.requested() == 'auto' else backends.requested()}")


if __name__ == "__main__":
    main()
