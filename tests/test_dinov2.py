"""nwflow.data.dinov2: ViT-S/14 with the official DINOv2 parameter layout, offline.

The real weights are not reachable on the test machines, so everything runs on randomly
initialised networks: the key layout is compared with the official one written out here,
the forward pass with an independent float64 re-implementation, the loader's paths with a
saved state dict.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nwflow.data import dinov2 as dv


def official_vits14_layout() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of dinov2_vits14_pretrain.pth (DINOv2's vision_transformer.py,
    block_chunks=0, LayerScale on, MLP feed-forward, no registers)."""
    D, H = 384, 4 * 384
    layout: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 37 * 37 + 1, D),
        "mask_token": (1, D),
        "patch_embed.proj.weight": (D, 3, 14, 14),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    for i in range(12):
        p = f"blocks.{i}."
        layout.update({
            p + "norm1.weight": (D,), p + "norm1.bias": (D,),
            p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
            p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "ls1.gamma": (D,),
            p + "norm2.weight": (D,), p + "norm2.bias": (D,),
            p + "mlp.fc1.weight": (H, D), p + "mlp.fc1.bias": (H,),
            p + "mlp.fc2.weight": (D, H), p + "mlp.fc2.bias": (D,),
            p + "ls2.gamma": (D,),
        })
    return layout


@pytest.fixture(scope="module")
def random_model() -> dv.DinoVisionTransformer:
    """One randomly initialised ViT-S/14 (building one takes seconds on a busy CPU)."""
    return dv.load_dinov2(None, seed=0)


def test_state_dict_has_the_official_keys_and_shapes(random_model):
    sd = random_model.state_dict()
    expected = official_vits14_layout()
    assert set(sd) == set(expected)
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(v.numel() for v in sd.values()) == sum(math.prod(s) for s in expected.values())
    # About 22 million parameters, as published for ViT-S/14.
    assert 21.5e6 < sum(math.prod(s) for s in expected.values()) < 22.5e6


def test_registers_add_a_parameter_only_when_requested(random_model):
    assert random_model.register_tokens is None
    assert "register_tokens" not in random_model.state_dict()
    reg = dv.DinoVisionTransformer(img_size=28, embed_dim=12, depth=1, num_heads=2, num_register_tokens=4)
    assert tuple(reg.state_dict()["register_tokens"].shape) == (1, 4, 12)
    out = reg.eval().forward_features(torch.zeros(1, 3, 28, 28))
    assert out["patch"].shape == (1, 4, 12) and out["cls"].shape == (1, 12)


def test_random_model_is_flagged_and_gives_384_d_cls_features(random_model):
    model = random_model
    assert model.pretrained is False
    assert "NOT pretrained" in model.weights_source
    assert not model.training
    images = torch.rand(3, 3, 40, 50) * 2 - 1
    feats = dv.extract_features(images, model, batch_size=2, size=28)
    assert feats.shape == (3, 384) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    # The final LayerNorm has unit weight and zero bias at initialisation: each feature row
    # has mean 0 and (biased) variance 1.
    assert torch.allclose(feats.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(feats.var(1, unbiased=False), torch.ones(3), atol=1e-3)


def test_random_initialisation_is_deterministic_and_leaves_global_rng_alone(random_model):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    b = dv.load_dinov2(None, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(random_model.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = dv.load_dinov2(None, seed=1)
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    fa, fb, fc = (dv.extract_features(x, m, size=28) for m in (random_model, b, c))
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa, fc)


def test_checkpoint_round_trip_loads_strictly(tmp_path, random_model):
    g = torch.Generator().manual_seed(5)
    # Perturb every tensor (LayerScale, norms, biases too) so a silent mis-load would show.
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in random_model.state_dict().items()}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    loaded = dv.load_dinov2(path, seed=99)
    assert loaded.pretrained is True and str(path) in loaded.weights_source
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, 42, 42) * 2 - 1
    f1 = dv.extract_features(x, loaded, size=42)
    assert torch.equal(f1, dv.extract_features(x, loaded, size=42))           # deterministic
    assert not torch.allclose(f1, dv.extract_features(x, random_model, size=42))

    bad = dict(state)
    bad.pop("blocks.3.ls2.gamma")
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="ls2.gamma"):
        dv.load_dinov2(tmp_path / "missing.pth")
    extra = dict(state)
    extra["register_tokens"] = torch.zeros(1, 4, 384)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="register_tokens"):
        dv.load_dinov2(tmp_path / "extra.pth")


def test_hub_weights_use_the_official_url(monkeypatch, random_model):
    state = {k: v + 1.0 for k, v in random_model.state_dict().items()}
    seen = {}

    def fake_download(url, map_location=None, progress=True):
        seen["url"] = url
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = dv.load_dinov2("hub")
    assert seen["url"] == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert model.pretrained is True
    assert torch.equal(model.pos_embed, state["pos_embed"])


def test_find_local_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("NWFLOW_DINOV2_WEIGHTS", raising=False)
    assert dv.find_local_weights() is None
    named = tmp_path / "mine.pth"
    named.write_bytes(b"x")
    monkeypatch.setenv("NWFLOW_DINOV2_WEIGHTS", str(named))
    assert dv.find_local_weights() == named
    monkeypatch.setenv("NWFLOW_DINOV2_WEIGHTS", str(tmp_path / "absent.pth"))
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert dv.find_local_weights() == cached


def test_bad_arguments_raise(random_model):
    with pytest.raises(ValueError, match="weights"):
        dv.load_dinov2("/no/such/file.pth")
    with pytest.raises(TypeError, match="weights"):
        dv.load_dinov2(3.5)
    model = random_model
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.zeros(1, 3, 30, 28))
    with pytest.raises(ValueError, match="size"):
        dv.preprocess(torch.zeros(1, 3, 8, 8), size=30)
    with pytest.raises(ValueError, match="images"):
        dv.preprocess(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        dv.extract_features(torch.zeros(1, 3, 8, 8), model, batch_size=0)


def test_preprocess_is_the_imagenet_normalisation():
    values = torch.tensor([-1.0, 0.0, 0.5])  # one constant image per value, book range [-1, 1]
    images = values[:, None, None, None].expand(3, 3, 20, 20).clone()
    out = dv.preprocess(images, size=28)
    assert out.shape == (3, 3, 28, 28)
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    for i, v in enumerate(values.tolist()):
        expect = ((v + 1) / 2 - mean) / std
        got = out[i].mean(dim=(1, 2)).double().numpy()
        np.testing.assert_allclose(got, expect, atol=1e-5)
        assert float(out[i].std(dim=(1, 2)).max()) < 1e-5  # resizing a constant keeps it constant
    u8 = dv.preprocess(torch.full((1, 3, 28, 28), 255.0), value_range=(0, 255))
    np.testing.assert_allclose(u8[0, :, 0, 0].numpy(), (1 - mean) / std, atol=1e-5)


def reference_forward(model: dv.DinoVisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """An independent float64 forward pass at the native grid: unfold patches, explicit attention."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p, D = model.patch_size, model.embed_dim
    heads = model.blocks[0].attn.num_heads
    x = images.double()
    B = x.shape[0]
    patches = torch.nn.functional.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, L, 3 p p)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    z = torch.cat([sd["cls_token"].expand(B, 1, D), tok], 1) + sd["pos_embed"]

    def ln(v, w, b):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * w + b

    for i in range(len(model.blocks)):
        g = lambda name, i=i: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = ln(z, g("norm1.weight"), g("norm1.bias"))
        qkv = h @ g("attn.qkv.weight").T + g("attn.qkv.bias")
        q, k, v = qkv.split(D, dim=-1)
        split = lambda a: a.reshape(B, -1, heads, D // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, -1, D)
        z = z + g("ls1.gamma") * (o @ g("attn.proj.weight").T + g("attn.proj.bias"))
        h = ln(z, g("norm2.weight"), g("norm2.bias"))
        h = h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        z = z + g("ls2.gamma") * (h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias"))
    return ln(z, sd["norm.weight"], sd["norm.bias"])[:, 0]


def test_forward_matches_an_independent_float64_reference():
    torch.manual_seed(0)
    model = dv.DinoVisionTransformer(img_size=42, patch_size=14, embed_dim=24, depth=2, num_heads=3,
                                     init_value=0.5).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 42, 42, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
    ref = reference_forward(model, x)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=1e-9)


def test_position_embedding_interpolation():
    model = dv.DinoVisionTransformer(img_size=70, patch_size=14, embed_dim=8, depth=1, num_heads=2).eval()
    # The native 5 x 5 grid is returned unchanged.
    assert model.interpolate_pos_encoding(5, 5) is model.pos_embed
    with torch.no_grad():
        model.pos_embed.copy_(torch.arange(8.0).expand(1, 26, 8))  # the same vector at every position
        model.pos_embed[0, 0] = -1.0                              # CLS slot differs
    for h, w in ((3, 3), (2, 7), (9, 4)):
        pos = model.interpolate_pos_encoding(h, w)
        assert pos.shape == (1, 1 + h * w, 8)
        assert torch.equal(pos[0, 0], torch.full((8,), -1.0))      # CLS passes through
        # Bicubic interpolation reproduces a constant field.
        assert torch.allclose(pos[0, 1:], torch.arange(8.0).expand(h * w, 8), atol=1e-5)
    # A non-square image uses an h x w grid of tokens.
    out = model.forward_features(torch.zeros(1, 3, 28, 56))
    assert out["patch"].shape == (1, 8, 8)


def test_fit_pca_matches_the_covariance_eigendecomposition():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) * scales
    x = x @ torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0].T + 3.0
    pca = dv.fit_pca(x.float(), k=3)
    xn = x.numpy()
    cov = np.cov(xn, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    np.testing.assert_allclose(pca.variances.numpy(), evals[:3], rtol=1e-5)
    np.testing.assert_allclose(pca.explained_ratio.numpy(), evals[:3] / evals.sum(), rtol=1e-5)
    # Same subspace, component by component up to sign.
    np.testing.assert_allclose(np.abs(pca.components.numpy() @ evecs[:, :3]), np.eye(3), atol=1e-5)
    z = pca.transform(x)
    np.testing.assert_allclose(z.var(0).numpy(), evals[:3], rtol=1e-5)
    zw = dv.fit_pca(x, k=3, whiten=True).transform(x)
    np.testing.assert_allclose(zw.var(0).numpy(), np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(zw.mean(0).numpy(), np.zeros(3), atol=1e-10)
    with pytest.raises(ValueError, match="k must"):
        dv.fit_pca(x, k=7)
