import io
import math

import pytest
import torch

from sadiffuseq.config import DiffusionConfig
from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.diffusion.schedule import alphas_cumprod, betas
from sadiffuseq.diffusion.timesteps import LossAwareSampler, UniformSampler


@pytest.mark.parametrize(
    "name, f",
    [
        ("sqrt", lambda s: 1 - math.sqrt(s + 1e-4)),
        ("cosine", lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2),
    ],
)
def test_schedules_telescope_to_the_continuous_alpha_bar(name, f):
    # With no clipping, prod_{i<=t} f((i+1)/T)/f(i/T) = f((t+1)/T) / f(0).
    T = 1000
    ab = alphas_cumprod(name, T)
    b = betas(name, T)
    for t in (0, 10, 500, 900):
        if (b[: t + 1] < 0.999).all():
            assert ab[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert (ab[1:] < ab[:-1]).all() and ab[0] < 1 and ab[-1] >= 0


def test_linear_schedule_is_ddpm_range_rescaled():
    b = betas("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert betas("linear", 2000)[-1].item() == pytest.approx(0.01)


def test_noising_touches_only_target_positions_with_the_right_statistics():
    torch.manual_seed(0)
    diff = Diffusion(DiffusionConfig(steps=100))
    B, L, d = 4, 64, 32
    x0 = torch.randn(B, L, d)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, 20:] = True
    t = torch.tensor([0, 10, 50, 99])
    x_t = diff.noise_inputs(x0, t, mask)
    assert torch.equal(x_t[:, :20], x0[:, :20])  # source untouched, bit for bit
    assert (x_t[:, 20:] != x0[:, 20:]).all()
    # x_t - sqrt(ab) x0 should be N(0, 1 - ab): check the empirical variance at t = 99 over 44*32 values.
    ab = diff.alphas_cumprod[99].item()
    resid = x_t[3, 20:] - math.sqrt(ab) * x0[3, 20:]
    assert resid.var().item() == pytest.approx(1 - ab, rel=0.1)


class EchoModel(torch.nn.Module):
    """A stand-in denoiser: fixed embeddings; predicts x_t plus an optional offset at chosen positions."""

    def __init__(self, vocab=11, d=4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.embed = torch.nn.Embedding(vocab, d)
        self.embed.weight.data = torch.randn(vocab, d, generator=g)
        self.offset = None

    def get_embeds(self, ids):
        return self.embed(ids)

    def get_logits(self, x):
        return x @ self.embed.weight.t()

    def forward(self, x, t, doc_ids=None):
        return x if self.offset is None else x + self.offset


def test_loss_terms_match_a_hand_computed_masked_average():
    torch.manual_seed(0)
    diff = Diffusion(DiffusionConfig(steps=50))
    model = EchoModel()
    ids = torch.tensor([[1, 5, 2, 7, 8, 3, 0, 0], [1, 4, 6, 2, 9, 3, 0, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([10, 30])
    torch.manual_seed(7)
    out = diff.training_losses(model, {"ids": ids, "input_mask": mask}, t)

    # Recompute with the same random draws, position by position.
    torch.manual_seed(7)
    emb = model.embed.weight[ids]
    x0 = emb + math.sqrt(1 - diff.alphas_cumprod[0].item()) * torch.randn_like(emb)
    noise = torch.randn_like(x0)
    for b in range(2):
        ab = diff.alphas_cumprod[t[b]].item()
        ab_last = diff.alphas_cumprod[-1].item()
        mse, prior, ce, n = 0.0, 0.0, 0.0, 0
        for i in range(ids.shape[1]):
            if not mask[b, i]:
                continue
            x_t = math.sqrt(ab) * x0[b, i] + math.sqrt(1 - ab) * noise[b, i]  # the echo model predicts x_t
            mse += ((x_t - x0[b, i]) ** 2).mean().item()
            prior += (ab_last * x0[b, i] ** 2).mean().item()
            logits = model.embed.weight @ x0[b, i]
            ce += (torch.logsumexp(logits, 0) - logits[ids[b, i]]).item()
            n += 1
        assert out["mse"][b].item() == pytest.approx(mse / n, rel=1e-5)
        assert out["prior"][b].item() == pytest.approx(prior / n, rel=1e-5)
        assert out["rounding"][b].item() == pytest.approx(ce / n, rel=1e-5)
        total = out["mse"][b] + out["rounding"][b] + out["prior"][b]
        assert out["loss"][b].item() == pytest.approx(total.item(), rel=1e-6)


def test_predictions_at_source_positions_do_not_enter_the_loss():
    diff = Diffusion(DiffusionConfig(steps=50))
    model = EchoModel()
    ids = torch.tensor([[1, 5, 6, 2, 7, 8, 3, 0]])
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([20])
    torch.manual_seed(3)
    clean = diff.training_losses(model, {"ids": ids, "input_mask": mask}, t)
    model.offset = torch.zeros(1, 8, 4)
    model.offset[:, :4] = 1e3  # wildly wrong predictions, but only on source positions
    torch.manual_seed(3)
    perturbed = diff.training_losses(model, {"ids": ids, "input_mask": mask}, t)
    for k in clean:
        assert torch.allclose(clean[k], perturbed[k]), k
    model.offset[:, 5] = 1.0  # a wrong prediction on a target position does count
    torch.manual_seed(3)
    shifted = diff.training_losses(model, {"ids": ids, "input_mask": mask}, t)
    assert shifted["mse"].item() > clean["mse"].item()


def test_loss_aware_sampler_is_uniform_until_warm_then_proportional_to_rms_loss():
    T = 4
    s = LossAwareSampler(T, seed=0, history=2, uniform_prob=0.0)
    assert torch.allclose(s.probabilities(), torch.full((T,), 0.25, dtype=torch.float64))
    for t, loss in [(0, 1.0), (0, 1.0), (1, 2.0), (1, 2.0), (2, 3.0), (2, 5.0), (3, 4.0)]:
        s.update(torch.tensor([t]), torch.tensor([loss]))
    assert not s.warmed_up()
    s.update(torch.tensor([3]), torch.tensor([4.0]))
    rms = torch.tensor([1.0, 2.0, math.sqrt((9 + 25) / 2), 4.0], dtype=torch.float64)
    assert torch.allclose(s.probabilities(), rms / rms.sum())
    t, w = s.sample(1000, torch.device("cpu"))
    p = rms / rms.sum()
    assert torch.allclose(w.double(), 1.0 / (T * p[t]), rtol=1e-6)
    # The history is a sliding window: a new loss replaces the oldest.
    s.update(torch.tensor([0]), torch.tensor([3.0]))
    assert s.losses[0].tolist() == [1.0, 3.0]


def test_deferred_loss_aware_updates_enter_one_step_late_and_resume_exactly():
    """As on a GPU (``defer``): the losses of step n count from the sample of step n + 2 on; a checkpoint taken in
    between carries the pending update, so the resumed sampler draws what the uninterrupted one draws."""
    T, history = 3, 1
    now = LossAwareSampler(T, seed=0, history=history, uniform_prob=0.0)
    late = LossAwareSampler(T, seed=0, history=history, uniform_prob=0.0, defer=True)
    for t, loss in [(0, 1.0), (1, 2.0), (2, 4.0)]:
        for s in (now, late):
            s.update(torch.tensor([t]), torch.tensor([loss]))
    assert now.warmed_up() and not late.warmed_up()  # nothing entered yet: no sample has run
    late.sample(1, torch.device("cpu"))  # enters all but the last update
    assert late.counts.tolist() == [1, 1, 0]
    buffer = io.BytesIO()
    torch.save(late.state_dict(), buffer)  # as checkpoints store it, and load it back (weights only)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = LossAwareSampler(T, seed=7, history=history, uniform_prob=0.0, defer=True)
    resumed.load_state_dict(state)
    late.update(torch.tensor([0]), torch.tensor([8.0]))
    resumed.update(torch.tensor([0]), torch.tensor([8.0]))
    for s in (late, resumed):
        s.sample(1, torch.device("cpu"))  # enters (2, 4.0): warm now, the (0, 8.0) still pending
        assert s.losses[:, 0].tolist() == [1.0, 2.0, 4.0]
    assert torch.equal(late.sample(50, torch.device("cpu"))[0], resumed.sample(50, torch.device("cpu"))[0])
    assert late.losses[:, 0].tolist() == [1.0, 2.0, 4.0]  # (0, 8.0) waits for the next step's update
    late.update(torch.tensor([1]), torch.tensor([16.0]))
    late.sample(1, torch.device("cpu"))
    assert late.losses[:, 0].tolist() == [8.0, 2.0, 4.0]


def test_timestep_samplers_resume_exactly():
    a = UniformSampler(100, seed=5)
    a.sample(10, torch.device("cpu"))
    b = UniformSampler(100, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sample(10, torch.device("cpu"))[0], b.sample(10, torch.device("cpu"))[0])
