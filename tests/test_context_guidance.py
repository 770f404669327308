"""Classifier-free guidance on a text context: the unconditional half gets the trained null embedding, the
scale acts, 1 (or None) skips the unconditional pass and 0 gives the unconditional prediction."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from maisi import sampling
from maisi.families.ct import NoiseSchedule
from maisi.sampling import ContextGuidance, denoise, make_scheduler

N, L, D = 2, 77, 8
CONTEXT = torch.randn(N, L, D, generator=torch.Generator().manual_seed(1))
NULL = torch.randn(1, L, D, generator=torch.Generator().manual_seed(2))  # stands for the null prompt's
NOISE = torch.randn(N, 4, 4, 4, 2, generator=torch.Generator().manual_seed(0))
V_DDIM = NoiseSchedule("ddpm", prediction_type="v_prediction")


class RecordingTextUNet(torch.nn.Module):
    """Output = 0.3 x + mean of the context per sample; records every call's batch size and context."""

    def __init__(self):
        super().__init__()
        self.contexts: list[torch.Tensor] = []

    def forward(self, x, timesteps, context):
        self.contexts.append(context.clone())
        return 0.3 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def run(unet, guidance, context=CONTEXT, steps=3):
    return denoise(
        unet,
        make_scheduler(V_DDIM, "ddim"),
        NOISE,
        steps,
        {"context": context},
        context_guidance=guidance,
        progress=False,
    )


def test_unconditional_half_receives_exactly_the_null_embedding_in_one_call_per_step():
    unet = RecordingTextUNet()
    run(unet, ContextGuidance(NULL, 7.0))
    assert len(unet.contexts) == 3  # one batched forward per step
    for context in unet.contexts:
        assert context.shape == (2 * N, L, D)
        assert torch.equal(context[:N], CONTEXT)  # conditional half first
        assert torch.equal(context[N:], NULL.expand(N, L, D))  # the trained null embedding, not -1


def test_guided_output_is_uncond_plus_g_times_cond_minus_uncond(monkeypatch):
    seen: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []
    real_step = sampling._step

    def recording_step(scheduler, output, t, next_t, x, generator, final):
        seen.append(output.clone())
        xs.append(x.clone())
        return real_step(scheduler, output, t, next_t, x, generator, final)

    monkeypatch.setattr(sampling, "_step", recording_step)
    run(RecordingTextUNet(), ContextGuidance(NULL, 4.0))
    for output, x in zip(seen, xs):
        cond = 0.3 * x + CONTEXT.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        uncond = 0.3 * x + NULL.mean()
        torch.testing.assert_close(output, uncond + 4.0 * (cond - uncond))


@pytest.mark.parametrize("scale", [None, 1.0])
def test_scale_1_or_none_runs_the_conditional_model_alone(scale):
    unet = RecordingTextUNet()
    out = run(unet, ContextGuidance(NULL, scale))
    assert all(torch.equal(c, CONTEXT) for c in unet.contexts)  # no unconditional pass
    assert torch.equal(out, run(RecordingTextUNet(), None))


def tiny_text_unet() -> DiffusionModelUNet:
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=4,
        with_conditioning=True,
        cross_attention_dim=D,
    ).eval()
    for p in unet.parameters():  # zero-initialised output convolutions would make the context irrelevant
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return unet


def test_on_a_monai_cross_attention_unet_the_scale_changes_the_output_and_0_is_unconditional():
    unet = tiny_text_unet()
    conditional = run(unet, None)
    guided = run(unet, ContextGuidance(NULL, 5.0))
    assert not torch.allclose(guided, conditional, atol=1e-3)
    assert not torch.allclose(guided, run(unet, ContextGuidance(NULL, 2.0)), atol=1e-3)
    unconditional = run(unet, None, context=NULL.expand(N, L, D))
    torch.testing.assert_close(run(unet, ContextGuidance(NULL, 0.0)), unconditional, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unconditional, conditional, atol=1e-3)


def test_bad_context_guidance_is_refused():
    with pytest.raises(ValueError, match="not both"):
        denoise(
            RecordingTextUNet(),
            make_scheduler(V_DDIM, "ddim"),
            NOISE,
            2,
            {"context": CONTEXT, "class_labels": torch.ones(N, dtype=torch.long)},
            guidance_scale=2.0,
            context_guidance=ContextGuidance(NULL, 2.0),
        )
    with pytest.raises(
        ValueError, match=r"does not fit context of shape \(2, 77, 8\): expected \(1 or 2, 77, 8\)"
    ):
        run(RecordingTextUNet(), ContextGuidance(torch.zeros(1, 77, 16), 2.0))
    with pytest.raises(ValueError, match="needs unet_inputs\\['context'\\]"):
        denoise(
            RecordingTextUNet(),
            make_scheduler(V_DDIM, "ddim"),
            NOISE,
            2,
            {},
            context_guidance=ContextGuidance(NULL, 2.0),
        )
    with pytest.raises(ValueError, match="finite number >= 0 or None, got -1"):
        ContextGuidance(NULL, -1.0)
    with pytest.raises(ValueError, match="null_context must be"):
        ContextGuidance(NULL[0], 2.0)
