"""``hessian`` config group: what the Hessian stage computes and how precisely."""

from __future__ import annotations

from dataclasses import dataclass

from hawq.schema import require

METHODS = ("hessian", "fisher")


@dataclass
class HessianConfig:
    """Schema of ``conf/hessian/*.yaml`` (validated with :func:`hawq.config.typed`)."""

    method: str = "hessian"  # hessian (HVP traces, eigenvalues) | fisher (per-sample grads)
    batches: int = 1  # batches averaged; 1 keeps the first-order graph for every product
    batch_size: int = 256  # samples per batch
    split: str = "train"  # curvature of the training loss
    rtol: float = 0.01  # target sqrt(sum stderr^2) / sum |trace| (cross-fitted, unbiased stop)
    min_samples: int = 10  # standard errors of fewer samples are unreliable
    max_samples: int = 500  # Rademacher samples at most
    estimator: str = "sandwich"  # sandwich | hutchpp | hutchinson
    sketch: int = 40  # sandwich / Hutch++ sketch columns (2x that many extra products)
    chunk: int = 1  # probes per vmapped product, stop rule checked per chunk (CPU gain varies)
    top_k: int = 1  # eigenvalues per op (0: skip eigenvalues)
    eig_which: str = "LA"  # LA: largest algebraic first (lambda_max) | LM: largest magnitude
    eig_method: str = "lanczos"  # lanczos | power
    tol: float = 1e-4  # relative eigen-residual to stop at
    max_iter: int = 100  # products per op for eigenvalues
    backend: str = "auto"  # auto (double_backward unless it fails, untimed) | double_backward|func
    dtype: str = "float32"  # float32 | float64
    activation: bool = True  # activation traces (every op operand)
    density: bool = True  # SLQ spectral density plot (whole model)
    density_per_layer: bool = False  # also one SLQ per op (one Lanczos run per op)
    density_steps: int = 40  # Lanczos steps per SLQ run
    density_vectors: int = 1  # SLQ runs
    seed: int = 0  # probe vectors

    def __post_init__(self) -> None:
        require(self.method in METHODS, "method", self.method, ", ".join(METHODS))
        require(self.batches >= 1, "batches", self.batches, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.split in ("train", "test"), "split", self.split, "train, test")
        require(0 < self.rtol < 1, "rtol", self.rtol, "0 < rtol < 1")
        require(self.min_samples >= 2, "min_samples", self.min_samples, "an integer >= 2")
        require(
            self.max_samples >= self.min_samples,
            "max_samples",
            self.max_samples,
            "an integer >= min_samples",
        )
        require(
            self.estimator in ("sandwich", "hutchpp", "hutchinson"),
            "estimator",
            self.estimator,
            "sandwich, hutchpp, hutchinson",
        )
        require(self.eig_which in ("LA", "LM"), "eig_which", self.eig_which, "LA, LM")
        require(self.sketch >= 1, "sketch", self.sketch, "an integer >= 1")
        require(self.chunk >= 1, "chunk", self.chunk, "an integer >= 1")
        require(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0")
        require(
            self.eig_method in ("lanczos", "power"), "eig_method", self.eig_method, "lanczos, power"
        )
        require(self.tol > 0, "tol", self.tol, "> 0")
        require(self.max_iter >= 1, "max_iter", self.max_iter, "an integer >= 1")
        require(
            self.backend in ("auto", "double_backward", "func"),
            "backend",
            self.backend,
            "auto, double_backward, func",
        )
        require(self.dtype in ("float32", "float64"), "dtype", self.dtype, "float32, float64")
        require(self.density_steps >= 2, "density_steps", self.density_steps, "an integer >= 2")
        require(
            self.density_vectors >= 1, "density_vectors", self.density_vectors, "an integer >= 1"
        )
