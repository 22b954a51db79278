"""The AnInfoNCE experiment: does the loss recover latents that InfoNCE collapses?

The controlled setting of Rusak, Reizinger, Juhos et al. (2024), "InfoNCE: Identifying the Gap Between
Theory and Practice" (brendel-group/AnInfoNCE), at toy scale:

1. latents ``z`` uniform on the sphere ``S^{d-1}`` (a normal sample, normalised);
2. positive pairs ``z' = normalise(z + sigma * eps)``, ``eps ~ N(0, I)``, with an anisotropic,
   geometric range of per-dimension stds ``sigma_i`` (some latents vary a lot within a pair, some
   hardly), draws far off the sphere rejected as in the reference sampler; the true conditional
   concentration is ``Lambda_i ~ 1 / sigma_i^2``;
3. a fixed random invertible mixing ``x = g(z)`` (a square LeakyReLU MLP with well-conditioned weights);
4. an MLP encoder ``f`` trained on ``(g(z), g(z'))`` with InfoNCE (cosine NT-Xent, temperature tau)
   and, from the same initialisation and data stream, with AnInfoNCE (learned diagonal Lambda);
5. on held-out samples, the R^2 of a linear regression from ``f(g(z))`` to each true latent ``z_i``,
   and the learned Lambda (``softplus(lam)``, its output dimensions matched to latents by the
   Hungarian assignment on |correlation|) against the true ``1 / sigma_i^2``.

What it shows at the default (d = 8, sigma 0.5 -> 0.05, 1000 steps; seeds 0-2): InfoNCE, whose single
temperature cannot fit every latent's variability, loses the strongly varying latents (R^2 of latent 1,
sigma 0.36: 0.07-0.63) and blurs the least varying ones (latents 6-7: 0.71-0.95), while AnInfoNCE
recovers latents 1-7 with R^2 >= 0.9 and its Lambda orders them like the true concentration. Latent 0
(sigma 0.5, more than the spread of one coordinate on S^7, 1/sqrt(8) = 0.35) changes sign within most
pairs; at this budget both losses usually fold it (R^2 ~ 0; its sign is lost). So the headline numbers
are the mean R^2 and the R^2 over the most / least varying quarter of the latents (:func:`summarize`).
Runtime: about 30 s on two CPU cores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from core import atomic
from core.errors import ConfigError
from core.models import torch_threads
from core.train.losses import AnInfoNCELoss, nt_xent
from core.workspace import Workspace

log = logging.getLogger(__name__)

LOSSES = ("infonce", "aninfonce")
#: A latent counts as recovered when the linear read-out explains at least this share of its variance.
RECOVERED_R2 = 0.5
DATASET = "aninfonce_synthetic"
RUN_KIND = "experiment-aninfonce"


@dataclass(frozen=True)
class AnInfoNCEExperimentConfig:
    """Settings of the synthetic experiment (defaults: a clear result in about 30 s on two CPU cores).

    Args:
        dim: number of latents d (the sphere is S^{d-1}; the encoder outputs d dimensions too).
        sigma_max / sigma_min: per-latent noise stds of a positive pair, geometric from max (latent 0,
            varies most) to min (latent d-1, varies least).
        steps / batch_size: optimiser updates and positive pairs per update, for each loss.
        lr: Adam LR of the encoder; lambda_lr: Adam LR of AnInfoNCE's lam (the reference uses 1e-4 /
            1e-3 over 300k steps; here 1e-3 / 0.2 let Lambda spread out within 1k steps; at 0.05 it
            stays nearly flat and AnInfoNCE loses the strongly varying latents like InfoNCE).
        tau: InfoNCE temperature (cosine similarity / tau), the SimCLR-style baseline.
        hidden / depth: encoder MLP width and number of hidden layers; mixing_layers: layers of g.
        norm_threshold: reject a noisy point whose norm before projection is off 1 by this much (the
            reference's 0.1; see :class:`LatentSampler`); None keeps every draw.
        n_eval: held-out samples to fit the linear read-out, and as many again to score it.
        seed: seeds the mixing, the encoder init (shared by both losses), the data and lam's init.
        num_threads: torch CPU threads during the run (restored after); None keeps torch's setting.
            One thread is the default because this small MLP gains little from more and loses a lot
            when the cores are shared.
    """

    dim: int = 8
    sigma_max: float = 0.5
    sigma_min: float = 0.05
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    lambda_lr: float = 0.2
    tau: float = 0.1
    hidden: int = 128
    depth: int = 3
    mixing_layers: int = 3
    norm_threshold: float | None = 0.1
    n_eval: int = 4096
    seed: int = 0
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        checks = [
            (self.dim >= 2, f"dim must be >= 2; got {self.dim}"),
            (0 < self.sigma_min <= self.sigma_max, f"need 0 < sigma_min <= sigma_max; got {self.sigma_min}, {self.sigma_max}"),
            (self.steps >= 1, f"steps must be >= 1; got {self.steps}"),
            (self.batch_size >= 2, f"batch_size must be >= 2; got {self.batch_size}"),
            (self.lr > 0 and self.lambda_lr > 0, "lr and lambda_lr must be > 0"),
            (self.tau > 0, f"tau must be > 0; got {self.tau}"),
            (self.hidden >= 1 and self.depth >= 1 and self.mixing_layers >= 1, "hidden, depth, mixing_layers must be >= 1"),
            (self.n_eval >= 4 * self.dim, f"n_eval must be >= 4 * dim; got {self.n_eval}"),
            (self.num_threads is None or self.num_threads >= 1, f"num_threads must be >= 1; got {self.num_threads}"),
            (self.norm_threshold is None or self.norm_threshold > 0, "norm_threshold must be > 0 or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def sigmas(self) -> np.ndarray:
        """(d,) per-latent noise std, geometric from sigma_max down to sigma_min."""
        return np.geomspace(self.sigma_max, self.sigma_min, self.dim)

    def true_lambda(self) -> np.ndarray:
        """(d,) the true concentration of the conditional, 1 / sigma_i^2 (small noise on the sphere)."""
        return 1.0 / self.sigmas() ** 2


# -- data generating process ------------------------------------------------------------------------
class LatentSampler:
    """Positive pairs on the sphere with anisotropic noise, from a seeded generator.

    ``norm_threshold`` rejects (and redraws) a noisy point whose norm before projection differs from 1
    by that much or more, as the reference sampler does (brendel-group/AnInfoNCE,
    ``normal_spherical_sampler``, threshold 0.1): projecting a far-off point back onto the sphere would
    move every latent, not just the noisy ones. None keeps every draw.
    """

    def __init__(self, sigmas: np.ndarray, seed: int, norm_threshold: float | None = None) -> None:
        self.sigma = torch.as_tensor(sigmas, dtype=torch.float32)
        self.gen = torch.Generator().manual_seed(seed)
        self.norm_threshold = norm_threshold

    def marginal(self, n: int) -> torch.Tensor:
        """(n, d) uniform on S^{d-1}."""
        return F.normalize(torch.randn(n, len(self.sigma), generator=self.gen), dim=1)

    def pairs(self, n: int, tries: int = 8, max_rounds: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, z') each (n, d): z' = normalise(z + sigma * eps), redrawn while rejected.

        Each round draws ``tries`` candidates per pending row at once and keeps the first accepted.
        """
        z = self.marginal(n)
        out = torch.empty_like(z)
        todo = torch.arange(n)
        for _ in range(max_rounds):
            k = tries if self.norm_threshold else 1
            moved = z[todo, None, :] + torch.randn(len(todo), k, len(self.sigma), generator=self.gen) * self.sigma
            norm = moved.norm(dim=-1)
            ok = (norm - 1).abs() < self.norm_threshold if self.norm_threshold else torch.ones_like(norm, dtype=torch.bool)
            first = ok.int().argmax(dim=1)
            done = ok.any(dim=1)
            rows = torch.arange(len(todo))[done]
            out[todo[done]] = moved[rows, first[done]] / norm[rows, first[done], None]
            todo = todo[~done]
            if len(todo) == 0:
                return z, out
        raise ConfigError(f"norm_threshold {self.norm_threshold} rejects nearly every positive; raise it or lower sigma_max")


def make_mixing(dim: int, layers: int, seed: int) -> nn.Sequential:
    """A fixed invertible g: R^d -> R^d, square layers with singular values 1..2 in random directions,
    LeakyReLU(0.2) between them."""
    gen = torch.Generator().manual_seed(seed + 1)
    mods: list[nn.Module] = []
    for i in range(layers):
        u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        lin = nn.Linear(dim, dim)
        with torch.no_grad():
            # U diag(s) V^T: condition number 2 per layer, with no latent direction favoured (scaling
            # the columns of one orthogonal matrix would shrink latent 0 most, confounding the result).
            lin.weight.copy_((u * torch.linspace(1.0, 2.0, dim)) @ v.T)
            lin.bias.copy_(0.1 * torch.randn(dim, generator=gen))
        mods.append(lin)
        if i < layers - 1:
            mods.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*mods).requires_grad_(False).eval()


def make_encoder(dim: int, hidden: int, depth: int, seed: int) -> nn.Sequential:
    """MLP f: R^d -> R^d with ``depth`` hidden layers (LeakyReLU); the losses normalise its output."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        widths = [dim, *([hidden] * depth)]
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            mods += [nn.Linear(a, b), nn.LeakyReLU(0.01)]
        mods.append(nn.Linear(widths[-1], dim))
        return nn.Sequential(*mods)


# -- training -----------------------------------------------------------------------------------------
def _cosine_nt_xent(tau: float) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """InfoNCE of the SimCLR kind: NT-Xent over both views with cosine similarity / tau."""

    def loss(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        return {"contrastive_loss": nt_xent(lambda x, y: x @ y.T / tau, a, b)}

    return loss


def train_encoder(cfg: AnInfoNCEExperimentConfig, loss_name: str, mixing: nn.Module,
                  progress: Callable[[int], None] | None = None) -> tuple[nn.Module, AnInfoNCELoss | None, float]:
    """Train f with one loss; returns (f, the AnInfoNCE module or None, final loss)."""
    if loss_name not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}; got {loss_name!r}")
    encoder = make_encoder(cfg.dim, cfg.hidden, cfg.depth, cfg.seed)
    sampler = LatentSampler(cfg.sigmas(), cfg.seed + 3, cfg.norm_threshold)  # the same stream for both losses
    groups: list[dict[str, Any]] = [{"params": list(encoder.parameters())}]
    an_loss: AnInfoNCELoss | None = None
    if loss_name == "aninfonce":
        an_loss = AnInfoNCELoss(cfg.dim, seed=cfg.seed)
        groups += an_loss.param_groups(lr=cfg.lr, lambda_lr=cfg.lambda_lr)
        loss_fn: Callable[..., dict[str, torch.Tensor]] = an_loss
    else:
        loss_fn = _cosine_nt_xent(cfg.tau)
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    value = float("nan")
    for step in range(cfg.steps):
        z, z_pos = sampler.pairs(cfg.batch_size)
        loss = loss_fn(encoder(mixing(z)), encoder(mixing(z_pos)))["contrastive_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if progress is not None:
            progress(step)
    return encoder.eval(), an_loss, value


# -- evaluation ---------------------------------------------------------------------------------------
def linear_r2(h_fit: np.ndarray, z_fit: np.ndarray, h_test: np.ndarray, z_test: np.ndarray) -> np.ndarray:
    """(d,) held-out R^2 of a least-squares affine map from representations h to each latent z_i."""
    design = np.c_[h_fit, np.ones(len(h_fit))]
    weights, *_ = np.linalg.lstsq(design, z_fit, rcond=None)
    pred = np.c_[h_test, np.ones(len(h_test))] @ weights
    return 1.0 - ((pred - z_test) ** 2).mean(0) / z_test.var(0)


def match_outputs(h: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(d,) for each latent i, the output dimension of h that tracks it (Hungarian on |corr|)."""
    from scipy.optimize import linear_sum_assignment

    d = z.shape[1]
    corr = np.abs(np.corrcoef(h.T, z.T)[: h.shape[1], h.shape[1]:])
    rows, cols = linear_sum_assignment(-np.nan_to_num(corr[:, :d]))
    out = np.empty(d, dtype=int)
    out[cols] = rows
    return out


def _evaluate(cfg: AnInfoNCEExperimentConfig, encoder: nn.Module, mixing: nn.Module,
              an_loss: AnInfoNCELoss | None, loss_name: str) -> pd.DataFrame:
    sampler = LatentSampler(cfg.sigmas(), cfg.seed + 4)  # held out: a stream training never saw
    with torch.no_grad():
        z = sampler.marginal(2 * cfg.n_eval)
        h = F.normalize(encoder(mixing(z)), dim=1)
    z_np, h_np = z.numpy().astype(np.float64), h.numpy().astype(np.float64)
    fit, test = slice(0, cfg.n_eval), slice(cfg.n_eval, None)
    r2 = linear_r2(h_np[fit], z_np[fit], h_np[test], z_np[test])
    matched = match_outputs(h_np[test], z_np[test])
    learned = np.full(cfg.dim, np.nan)
    if an_loss is not None:
        learned = an_loss.Lambda.detach().numpy().astype(np.float64)[matched]
    return pd.DataFrame({
        "loss": loss_name, "latent": np.arange(cfg.dim), "sigma": cfg.sigmas(), "true_lambda": cfg.true_lambda(),
        "r2": r2, "learned_lambda": learned, "matched_output": matched,
    })


def run_aninfonce_experiment(cfg: AnInfoNCEExperimentConfig | None = None, *,
                             progress: bool = False) -> pd.DataFrame:
    """Train with InfoNCE and AnInfoNCE and score both.

    Returns:
        One row per (loss, latent): ``loss``, ``latent`` (0 = largest sigma), ``sigma``,
        ``true_lambda`` (1/sigma^2), ``r2`` (held-out, linear read-out; 1 = recovered, ~0 = collapsed),
        ``learned_lambda`` (AnInfoNCE's softplus(lam) for the matched output; NaN for InfoNCE),
        ``matched_output``. ``df.attrs`` holds ``summary`` (:func:`summarize`), ``config`` and
        ``seconds`` (wall time).
    """
    cfg = cfg or AnInfoNCEExperimentConfig()
    start = time.perf_counter()
    frames = []
    with torch_threads(cfg.num_threads):
        mixing = make_mixing(cfg.dim, cfg.mixing_layers, cfg.seed)
        for loss_name in LOSSES:
            with progress_bar(progress, cfg.steps, loss_name) as tick:
                encoder, an_loss, final = train_encoder(cfg, loss_name, mixing, tick)
            frame = _evaluate(cfg, encoder, mixing, an_loss, loss_name)
            frame["final_loss"] = final
            frames.append(frame)
            log.info("aninfonce experiment: %s mean R^2 %.3f", loss_name, frame["r2"].mean())
    df = pd.concat(frames, ignore_index=True)
    df.attrs["seconds"] = time.perf_counter() - start
    df.attrs["config"] = asdict(cfg)
    df.attrs["summary"] = summarize(df)
    return df


def summarize(df: pd.DataFrame, n_tail: int | None = None) -> dict[str, float]:
    """Headline numbers of a result table.

    ``<loss>_mean_r2``; ``<loss>_r2_high_variance`` / ``<loss>_r2_low_variance``: mean R^2 over the
    ``n_tail`` latents with the largest / smallest sigma (default d // 4, at least 1: the two ends
    InfoNCE's single temperature fits worst); ``aninfonce_n_recovered``: latents AnInfoNCE recovers
    (R^2 >= 0.5); ``lambda_spearman``: rank correlation of AnInfoNCE's matched Lambda with the true
    1/sigma^2 over those latents (1 = same order; the Lambda of an output that tracks no latent means
    nothing); ``lambda_log_pearson``: Pearson correlation of their logarithms (a scale-free comparison
    of the two profiles).
    """
    from scipy.stats import pearsonr, spearmanr

    out: dict[str, float] = {}
    for loss_name, part in df.groupby("loss", sort=False):
        part = part.sort_values("sigma", ascending=False)
        k = n_tail or max(1, len(part) // 4)
        out[f"{loss_name}_mean_r2"] = float(part["r2"].mean())
        out[f"{loss_name}_r2_high_variance"] = float(part["r2"].head(k).mean())
        out[f"{loss_name}_r2_low_variance"] = float(part["r2"].tail(k).mean())
    an = df[(df["loss"] == "aninfonce") & df["learned_lambda"].notna()]
    recovered = an[an["r2"] >= RECOVERED_R2]
    out["aninfonce_n_recovered"] = float(len(recovered))
    if len(recovered) >= 3:
        out["lambda_spearman"] = float(spearmanr(recovered["learned_lambda"], recovered["true_lambda"]).statistic)
        out["lambda_log_pearson"] = float(
            pearsonr(np.log(recovered["learned_lambda"]), np.log(recovered["true_lambda"])).statistic)
    return out


# -- recording ----------------------------------------------------------------------------------------
def metric_rows(df: pd.DataFrame, run_id: str) -> list[dict[str, Any]]:
    """Catalog ``metrics`` rows: per loss (``model``), ``r2_dim_<i>``, ``lambda_dim_<i>`` (AnInfoNCE),
    ``true_lambda_dim_<i>`` (model ``truth``), and the :func:`summarize` numbers (``mean_r2``,
    ``r2_high_variance``, ``r2_low_variance``, ``lambda_spearman``, ``lambda_log_pearson``); dataset
    ``aninfonce_synthetic``."""
    base = {"run_id": run_id, "dataset": DATASET, "corruption": None, "severity": 0, "adaptation": "none"}
    rows = []
    for rec in df.to_dict("records"):
        i, model = int(rec["latent"]), str(rec["loss"])
        rows.append({**base, "model": model, "metric": f"r2_dim_{i}", "value": float(rec["r2"])})
        if model == "aninfonce":
            rows.append({**base, "model": model, "metric": f"lambda_dim_{i}", "value": float(rec["learned_lambda"])})
            rows.append({**base, "model": "truth", "metric": f"true_lambda_dim_{i}", "value": float(rec["true_lambda"])})
    for key, value in summarize(df).items():
        model, metric = ("aninfonce", key) if key.startswith("lambda_") else key.split("_", 1)
        rows.append({**base, "model": model, "metric": metric, "value": float(value)})
    return rows


def record_experiment(ws: Workspace, df: pd.DataFrame, run_id: str) -> int:
    """Write the result's metrics rows for ``run_id`` (replacing earlier ones); returns how many."""
    rows = metric_rows(df, run_id)
    return ws.catalog.insert("metrics", rows, replace_where="run_id = ?", replace_params=[run_id])


@dataclass(frozen=True)
class ExperimentResult:
    run_id: str
    run_dir: Path
    table: pd.DataFrame
    summary: dict[str, float]
    seconds: float


def run_and_record(ws: Workspace, cfg: AnInfoNCEExperimentConfig | None = None, *,
                   progress: bool = False) -> ExperimentResult:
    """Run the experiment as a recorded run: ``runs/<id>/results.csv`` + ``summary.json``, metrics rows."""
    from core.runs import recorded_run

    cfg = cfg or AnInfoNCEExperimentConfig()
    with recorded_run(ws, RUN_KIND, asdict(cfg), seed=cfg.seed) as run:
        df = run_aninfonce_experiment(cfg, progress=progress)
        atomic.write_text(run.dir / "results.csv", df.to_csv(index=False))
        summary = df.attrs["summary"]
        atomic.write_json(run.dir / "summary.json", {**summary, "seconds": df.attrs["seconds"]})
        record_experiment(ws, df, run.id)
        run.message = ", ".join(f"{k}={v:.3f}" for k, v in summary.items())
    return ExperimentResult(run.id, run.dir, df, summary, float(df.attrs["seconds"]))


# -- helpers ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str) -> Iterator[Callable[[int], None] | None]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"aninfonce experiment ({desc})", unit="step") as bar:
        yield lambda _step: bar.update(1)

