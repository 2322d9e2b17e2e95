"""AFT vision backbones in timm: registry, architecture, timm interface, errors, DeiT conversion, resampling."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

import aft_timm  # noqa: F401  (registers the aft_* models)
from aft_timm.layers import AftFull
from aft_timm.models import AftVisionTransformer, checkpoint_filter_fn, convert_vit_checkpoint

# paper Table 7 / 8 parameter counts (millions) at 1000 classes
PAPER_PARAMS = {
    'aft_full_tiny_patch16_224': 6.3,
    'aft_full_small_patch16_224': 22.6,
    'aft_simple_tiny_patch16_224': 5.7,
    'aft_simple_small_patch16_224': 22.1,
    'aft_conv_tiny_h32_k11_patch16_224': 5.4,
    'aft_conv_tiny_h192_k11_patch16_224': 5.9,
    'aft_conv_small_h16_k11_patch16_224': 20.3,
    'aft_conv_small_h384_k11_patch16_224': 22.5,
    'aft_conv_small_h384_k15_patch16_224': 23.0,
    'aft_conv_base_h32_k25_patch16_384': 79.7,
}
WARM_START_DEIT = {
    'aft_simple_tiny_patch16_224': 'timm/deit_tiny_patch16_224.fb_in1k',
    'aft_simple_small_patch16_224': 'timm/deit_small_patch16_224.fb_in1k',
    'aft_conv_tiny_h32_k11_patch16_224': 'timm/deit_tiny_patch16_224.fb_in1k',
    'aft_conv_tiny_h192_k11_patch16_224': 'timm/deit_tiny_patch16_224.fb_in1k',
    'aft_conv_small_h16_k11_patch16_224': 'timm/deit_small_patch16_224.fb_in1k',
    'aft_conv_small_h384_k11_patch16_224': 'timm/deit_small_patch16_224.fb_in1k',
    'aft_conv_small_h384_k15_patch16_224': 'timm/deit_small_patch16_224.fb_in1k',
    'aft_conv_base_h32_k25_patch16_384': 'timm/deit_base_patch16_384.fb_in1k',
}
# one small model per token mixer: (name, kwargs); token models need a fixed img_size
SMALL = {
    'full': ('aft_full_tiny_patch16_224', dict(depth=2, img_size=64)),
    'simple': ('aft_simple_tiny_patch16_224', dict(depth=2, img_size=64)),
    'conv': ('aft_conv_tiny_h32_k11_patch16_224', dict(depth=2, kernel_size=3)),
}


def small_model(mixer: str, seed: int = 0, **overrides) -> AftVisionTransformer:
    torch.manual_seed(seed)
    name, kwargs = SMALL[mixer]
    return timm.create_model(name, **dict(kwargs, **overrides))


def image(batch: int = 2, size=(64, 64), chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, *size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_exactly_the_paper_models():
    assert sorted(timm.list_models('aft_*')) == sorted(PAPER_PARAMS)
    assert timm.list_models(module='aft_vit') == timm.list_models('aft_*')


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_param_count_matches_paper(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, f'{name}: {count:.3f}M'


def test_conv_tiny_param_counts_exact():
    """Counted by hand: DeiT-tiny minus class token and position embedding, key rows per head, 11x11 kernels."""
    deit_tiny = 5_717_416
    no_cls_pos = 192 + 197 * 192
    for heads, expected in ((32, 5_356_072), (192, 5_962_792)):
        qkv_change = (heads - 192) * (192 + 1)
        kernel = heads * 11 * 11 + 2 * heads
        assert deit_tiny - no_cls_pos + 12 * (qkv_change + kernel) == expected
        with torch.device('meta'):
            model = timm.create_model(f'aft_conv_tiny_h{heads}_k11_patch16_224')
        assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize('mixer', sorted(SMALL))
def test_forward_backward(mixer):
    model = small_model(mixer, num_classes=7)
    out = model(image())
    assert out.shape == (2, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_conv_runs_at_any_size_divisible_by_patch():
    model = small_model('conv').eval()
    with torch.no_grad():
        for size in ((32, 32), (48, 80), (112, 16)):
            features = model.forward_features(image(1, size))
            assert features.shape == (1, size[0] // 16, size[1] // 16, 192)
            assert model(image(1, size)).shape == (1, 1000)


def test_conv_mixes_globally_beyond_its_kernel():
    """A 3x3-kernel AFT-conv token still sees a patch 5 rows and columns away (the global sum of Eq. 6)."""
    model = small_model('conv', depth=1, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        for block in model.blocks:
            block.token_mixer.gamma.fill_(1.0)
        x = image(1, (96, 96))
        y = x.clone()
        y[..., -16:, -16:] += 1.0  # change only the bottom-right patch
        a, b = model(x), model(y)
    assert a.shape == (1, 6, 6, 192)
    assert (a[0, 0, 0] - b[0, 0, 0]).abs().max() > 1e-6  # the top-left token sees it through the global sum


@pytest.mark.parametrize('mixer', sorted(SMALL))
def test_features_only_matches_manual_forward(mixer):
    model = small_model(mixer).eval()
    features = timm.create_model(SMALL[mixer][0], features_only=True, out_indices=(0, 1), **SMALL[mixer][1])
    features.load_state_dict({f'model.{k}': v for k, v in model.state_dict().items()
                              if f'model.{k}' in features.state_dict()})
    features.eval()
    x = image(1, (64, 64))
    with torch.no_grad():
        maps = features(x)
        tokens = model.patch_embed(x)
        if model.cls_token is not None:
            tokens = torch.cat([model.cls_token.expand(1, -1, -1), tokens], dim=1) + model.pos_embed
        expected = []
        for block in model.blocks:
            tokens = block(tokens)
            grid = tokens[:, 1:].reshape(1, 4, 4, -1) if tokens.ndim == 3 else tokens
            expected.append(grid.permute(0, 3, 1, 2))
    assert features.feature_info.channels() == [192, 192]
    assert features.feature_info.reduction() == [16, 16]
    assert len(maps) == 2
    for got, want in zip(maps, expected):
        assert got.shape == (1, 192, 4, 4)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('mixer', sorted(SMALL))
def test_forward_intermediates_formats(mixer):
    model = small_model(mixer).eval()
    x = image(2, (64, 64))
    with torch.no_grad():
        final, nchw = model.forward_intermediates(x, output_fmt='NCHW')
        nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        nlc = model.forward_intermediates(x, indices=[-1], output_fmt='NLC', norm=True, intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(nchw) == 2 and nchw[0].shape == (2, 192, 4, 4)
    for a, b in zip(nchw, nhwc):
        torch.testing.assert_close(a, b.permute(0, 3, 1, 2))
    assert nlc[0].shape == (2, 16, 192)
    patch_tokens = final[:, 1:] if final.ndim == 3 else final.flatten(1, 2)
    torch.testing.assert_close(nlc[0], patch_tokens)  # last block + norm = forward_features without prefix tokens
    with pytest.raises(AssertionError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NCL')


def test_prune_intermediate_layers():
    model = small_model('conv', depth=3).eval()
    x = image(1, (64, 64))
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers([1], prune_norm=True)
        assert kept == [1] and len(model.blocks) == 2
        assert model.num_classes == 0 and model.global_pool == ''
        torch.testing.assert_close(model(x).permute(0, 3, 1, 2), taps[1])


@pytest.mark.parametrize('mixer', sorted(SMALL))
def test_reset_classifier_keeps_device_dtype_and_mode(mixer):
    model = small_model(mixer).to(torch.float64)
    model.train()
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64 and model.head.training
    model.eval()
    model.reset_classifier(3, global_pool='')
    assert model.head.weight.dtype == torch.float64 and not model.head.training
    model.float()
    with torch.no_grad():
        assert model(image(1)).shape == ((1, 17, 3) if mixer != 'conv' else (1, 4, 4, 3))
        model.reset_classifier(0, global_pool='avg')
        assert isinstance(model.get_classifier(), torch.nn.Identity)
        assert model(image(1)).shape == (1, 192)


def test_pool_type_errors():
    model = small_model('conv')
    with pytest.raises(ValueError, match="AFT-conv has none"):
        model.reset_classifier(10, global_pool='token')
    with pytest.raises(ValueError, match='global_pool must be one of'):
        small_model('simple', global_pool='map')
    with pytest.raises(ValueError, match='token_mixer must be one of'):
        AftVisionTransformer(token_mixer='local')


def test_train_script_flags_reach_the_model():
    """timm's train.py passes drop_rate, drop_path_rate, global_pool, in_chans and num_classes to create_model."""
    model = timm.create_model('aft_conv_tiny_h32_k11_patch16_224', depth=2, drop_rate=0.3, drop_path_rate=0.2,
                              global_pool='avgmax', in_chans=1, num_classes=4)
    assert model.head_drop.p == 0.3
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.patch_embed.proj.in_channels == 1 and model.in_chans == 1
    assert model.global_pool == 'avgmax' and model.head.out_features == 4
    assert model(image(2, chans=1)).shape == (2, 4)


@pytest.mark.parametrize('mixer', sorted(SMALL))
def test_grad_checkpointing_recomputes_and_gives_same_grads(mixer):
    model = small_model(mixer, drop_path_rate=0.0).train()
    x = image()

    def grads():
        model.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    # a pre-hook: non-reentrant checkpointing stops the recomputation once it has what backward needs
    hook = model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    model.set_grad_checkpointing()
    checkpointed = grads()
    assert len(calls) == 3  # forward plus the recomputation in backward
    hook.remove()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_torchscript_matches_eager():
    for mixer in sorted(SMALL):
        model = small_model(mixer, depth=1).eval()
        scripted = torch.jit.script(model)
        x = image(1)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x))


def test_torch_compile_matches_eager():
    model = small_model('conv', depth=1, embed_dim=64, num_heads=4).eval()
    compiled = torch.compile(model)
    x = image(2, (32, 32))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mixer', sorted(SMALL))
def test_bf16_autocast_training_step(mixer):
    model = small_model(mixer, num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    target = torch.tensor([1, 7])
    for _ in range(2):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(image())
            loss = F.cross_entropy(logits, target)
        assert logits.dtype == torch.bfloat16
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before['patch_embed.proj.weight'], model.patch_embed.proj.weight)


def test_input_errors_name_the_expected_shape():
    conv = small_model('conv').eval()
    full = small_model('full').eval()
    with pytest.raises(AssertionError, match=r'\(B, 3, H, W\) with H and W multiples of 16'):
        conv(image(1, chans=4))
    with pytest.raises(AssertionError, match=r'\(B, 3, H, W\) with H and W multiples of 16.*50, 64'):
        conv(image(1, (50, 64)))
    with pytest.raises(AssertionError, match=r'Expected shape \(B, 3, 64, 64\).*fixed input size'):
        full(image(1, (96, 96)))
    with pytest.raises(AssertionError, match=r'\(B, 3, 64, 64\), got shape torch.Size\(\[3, 64, 64\]\)'):
        full(image(1)[0])
    with pytest.raises(AssertionError, match=r'\(B, 3, 64, 64\)'):
        full.forward_intermediates(image(1, chans=1))


def test_input_errors_survive_torchscript():
    scripted = torch.jit.script(small_model('conv', depth=1).eval())
    with pytest.raises(torch.jit.Error, match='multiples of 16'):
        scripted(image(1, (40, 64)))


def test_no_weight_decay_reaches_the_optimizer():
    model = small_model('full')
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    for name, param in model.named_parameters():
        exempt = name in ('cls_token', 'pos_embed') or name.endswith(('pos_u', 'pos_v')) or param.ndim <= 1
        assert (id(param) in no_decay) == exempt, name


def test_pretrained_tags_tell_what_exists():
    with_weights = set(timm.list_models('aft_*', pretrained=True))
    assert with_weights == {f'{name}.deit_in1k_init' for name in WARM_START_DEIT}
    for name in PAPER_PARAMS:
        tags = {t.split('.', 1)[1] for t in timm.list_models(name, include_tags=True)}
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.paper_ids == 'arXiv:2105.14103' and cfg.license == 'apache-2.0'
        assert cfg.first_conv == 'patch_embed.proj' and cfg.classifier == 'head'
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.interpolation == 'bicubic'
        assert cfg.fixed_input_size == (not name.startswith('aft_conv'))
        if name in WARM_START_DEIT:
            assert tags == {'deit_in1k_init', 'untrained'}
            assert cfg.tag == 'deit_in1k_init'  # pretrained=True without a tag loads the DeiT warm start
            assert cfg.hf_hub_id == WARM_START_DEIT[name]
            assert 'not an AFT ImageNet result' in cfg.notes
        else:
            assert tags == {'untrained'} and cfg.hf_hub_id is None
            with pytest.raises(RuntimeError, match='No pretrained weights'):
                timm.create_model(name, pretrained=True, depth=1)
    assert timm.models.get_pretrained_cfg('aft_conv_base_h32_k25_patch16_384').input_size == (3, 384, 384)


# ---------------------------------------------------------------- DeiT warm start (paper Table 8)


def deit_state_dict(name: str = 'deit_tiny_patch16_224', depth: int = 2, seed: int = 5):
    torch.manual_seed(seed)
    deit = timm.create_model(name, depth=depth)
    with torch.no_grad():
        for p in deit.parameters():
            p.add_(torch.randn_like(p))  # make every tensor distinguishable from any initialization
    return deit.state_dict()


@pytest.mark.parametrize('name', ['aft_conv_tiny_h32_k11_patch16_224', 'aft_simple_tiny_patch16_224'])
def test_deit_conversion_carries_exactly_the_paper_parts(name):
    source = deit_state_dict()
    torch.manual_seed(0)
    model = timm.create_model(name, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted, report = convert_vit_checkpoint(source, model)
    model.load_state_dict(converted, strict=True)
    after = model.state_dict()
    dim = 192
    key_dim = 32 if 'conv' in name else 192

    expected_carried = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
                        'head.weight', 'head.bias'}
    for i in range(2):
        for part in ('weight', 'bias'):
            expected_carried |= {f'blocks.{i}.{sub}.{part}' for sub in ('norm1', 'norm2', 'mlp.fc1', 'mlp.fc2')}
            expected_carried |= {f'blocks.{i}.token_mixer.proj.{part}', f'blocks.{i}.token_mixer.qkv.{part}[v]'}
    assert set(report['carried']) == expected_carried

    for key in report['carried']:
        if key.endswith('[v]'):
            key = key[:-3]
            src = key.replace('token_mixer', 'attn')
            assert torch.equal(after[key][dim + key_dim:], source[src][2 * dim:])  # value rows carried
            assert torch.equal(after[key][:dim + key_dim], before[key][:dim + key_dim])  # query, key rows kept
        else:
            assert torch.equal(after[key], source[key.replace('token_mixer', 'attn')]), key
    carried_keys = {key.split('[')[0] for key in report['carried']}
    for key in set(after) - carried_keys:
        assert torch.equal(after[key], before[key]), key  # position parameters, class token, ... unchanged
    assert set(report['initialized']) == (set(after) - carried_keys) | {
        f'blocks.{i}.token_mixer.qkv.{part}[q,k]' for i in range(2) for part in ('weight', 'bias')}
    if 'simple' in name:
        assert {'cls_token', 'pos_embed'} <= set(report['initialized'])
    else:
        assert {'cls_token', 'pos_embed'} <= set(report['dropped'])
        assert {'blocks.0.token_mixer.weight', 'blocks.1.token_mixer.gamma'} <= set(report['initialized'])


def test_deit_distilled_checkpoint_drops_distillation_parts():
    source = deit_state_dict('deit_tiny_distilled_patch16_224')
    model = timm.create_model('aft_conv_tiny_h32_k11_patch16_224', depth=2)
    converted, report = convert_vit_checkpoint({'model': source}, model)  # DeiT's own files wrap the state dict
    assert {'dist_token', 'head_dist.weight', 'head_dist.bias'} <= set(report['dropped'])
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.head.weight, source['head.weight'])


def test_deit_conversion_rejects_misfits():
    model = timm.create_model('aft_conv_tiny_h32_k11_patch16_224', depth=2)
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight' of shape \(384, 3, 16, 16\).*\(192, 3, 16, 16\)"):
        convert_vit_checkpoint(deit_state_dict('deit_small_patch16_224'), model)
    with pytest.raises(ValueError, match='3 blocks, the model 2'):
        convert_vit_checkpoint(deit_state_dict(depth=3), model)


def test_deit_warm_start_through_timm_loader(tmp_path):
    """timm's own pretrained path (file source) runs the conversion; a new class count keeps a fresh head."""
    source = deit_state_dict()
    path = tmp_path / 'deit_tiny.safetensors'
    save_file(source, str(path))
    name = 'aft_conv_tiny_h32_k11_patch16_224'
    model = timm.create_model(name, pretrained=True, depth=2, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source['blocks.1.mlp.fc2.weight'])
    assert torch.equal(model.head.weight, source['head.weight'])
    model = timm.create_model(name, pretrained=True, depth=2, num_classes=10, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == (10, 192)
    assert model.patch_embed.proj.weight.shape == (192, 1, 16, 16)
    torch.testing.assert_close(model.patch_embed.proj.weight[:, 0], source['patch_embed.proj.weight'].sum(1))
    assert torch.equal(model.norm.weight, source['norm.weight'])


# ---------------------------------------------------------------- position parameters at another input size


def _bilinear_grid(table: torch.Tensor, old: int, new: int, mode: str) -> torch.Tensor:
    grid = table.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode=mode, align_corners=False, antialias=mode == 'bicubic')
    return grid.permute(0, 2, 3, 1).reshape(new * new, -1)


def test_aft_full_checkpoint_resampled_to_another_size():
    source = small_model('full', img_size=64)  # 4x4 grid
    target = small_model('full', seed=3, img_size=96)  # 6x6 grid
    filtered = checkpoint_filter_fn(source.state_dict(), target)
    for name in ('pos_u', 'pos_v'):
        old = getattr(source.blocks[1].token_mixer, name).detach()
        new = filtered[f'blocks.1.token_mixer.{name}']
        assert new.shape == (37, 128)
        assert torch.equal(new[0], old[0])  # the class-token row is kept
        torch.testing.assert_close(new[1:], _bilinear_grid(old[1:], 4, 6, 'bilinear'))
    pos = filtered['pos_embed'][0]
    torch.testing.assert_close(pos[1:], _bilinear_grid(source.pos_embed[0, 1:].detach(), 4, 6, 'bicubic'))
    target.load_state_dict(filtered, strict=True)
    assert target(image(1, (96, 96))).shape == (1, 1000)
    same = checkpoint_filter_fn(source.state_dict(), small_model('full', img_size=64))
    assert all(torch.equal(same[k], v) for k, v in source.state_dict().items())


def test_set_input_size_resamples_position_parameters():
    model = small_model('full', img_size=64).eval()
    reference = small_model('full', seed=9, img_size=96)
    expected = checkpoint_filter_fn(model.state_dict(), reference)
    model.requires_grad_(False)
    model.set_input_size(img_size=96)
    mixer = model.blocks[0].token_mixer
    assert isinstance(mixer, AftFull) and mixer.pos_u.shape == (37, 128) and not mixer.pos_u.requires_grad
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert model(image(1, (96, 96))).shape == (1, 1000)
    with pytest.raises(AssertionError, match=r'\(B, 3, 96, 96\)'):
        model(image(1, (64, 64)))
