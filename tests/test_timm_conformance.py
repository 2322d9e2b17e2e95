"""timm's own model conformance checks (tests/test_models.py of timm's source distribution) on every aft model.

timm selects models for its tests by its own name filters and module lists, which never include a plugin's models,
so this file calls timm's test functions on our models directly. timm's test files are not committed here: run
`python tests/fetch_timm_tests.py` once to fetch those of the installed timm version into tests/.timm_upstream/.

Every check runs on all ten models, timm's slow prune contract included.
Not run: test_model_load_pretrained / test_model_features_pretrained (they download weights; the DeiT warm start
is tested offline in test_vision_models.py and through a local Hub in the Hub tests).
"""
import fnmatch
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict

import pytest
import timm

import aft_timm  # noqa: F401  (registers the aft_* models)

UPSTREAM_DIR = Path(__file__).resolve().parent / '.timm_upstream'
FETCH_HINT = 'run `python tests/fetch_timm_tests.py` (needs the package index once)'

AFT_MODELS = timm.list_models('aft_*')
AFT_MODELS_WITH_TAGS = timm.list_models('aft_*', include_tags=True)
# token models (class token, (B, N, C) features) belong with timm's ViT family in its non-spatial cfg test
NON_SPATIAL = ('aft_full_*', 'aft_simple_*')


def _load_upstream() -> ModuleType:
    path = UPSTREAM_DIR / 'test_models.py'
    if not path.is_file():
        pytest.fail(f"timm's test files are missing ({path}): {FETCH_HINT}.", pytrace=False)
    version_file = UPSTREAM_DIR / 'TIMM_VERSION'
    fetched = version_file.read_text().strip() if version_file.is_file() else 'unknown'
    if fetched != timm.__version__:
        pytest.fail(f'tests/.timm_upstream holds the tests of timm {fetched}, timm {timm.__version__} is installed: '
                    f'{FETCH_HINT}.', pytrace=False)
    # timm defines some tests (fx + torchscript) and picks smaller exclusion lists only outside GitHub Actions
    saved = os.environ.pop('GITHUB_ACTIONS', None)
    try:
        warnings.filterwarnings('ignore', category=pytest.PytestUnknownMarkWarning)  # timm's marks, set in its setup
        spec = importlib.util.spec_from_file_location('timm_upstream_test_models', path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ['GITHUB_ACTIONS'] = saved
    return module


@pytest.fixture(scope='module')
def upstream() -> ModuleType:
    return _load_upstream()


def _run(test_fn: Callable, *args) -> None:
    """Run one of timm's test functions; a skip inside it means the check did not run, which counts as a failure."""
    try:
        test_fn(*args)
    except pytest.skip.Exception as e:
        pytest.fail(f'timm skipped {test_fn.__name__}{args}: {e}')


CHECKS: Dict[str, Callable[[ModuleType, str], None]] = {
    'forward': lambda up, name: _run(up.test_model_forward, name, 1),
    'backward': lambda up, name: _run(up.test_model_backward, name, 2),
    'torchscript': lambda up, name: _run(up.test_model_forward_torchscript, name, 1),
    'forward_features': lambda up, name: _run(up.test_model_forward_features, name, 1),
    'forward_intermediates_features': lambda up, name: _run(up.test_model_forward_intermediates_features, name, 1),
    'forward_intermediates': lambda up, name: _run(up.test_model_forward_intermediates, name, 1),
    'forward_fx': lambda up, name: _run(up.test_model_forward_fx, name, 1),
    'backward_fx': lambda up, name: _run(up.test_model_backward_fx, name, 2),
    'forward_fx_torchscript': lambda up, name: _run(up.test_model_forward_fx_torchscript, name, 1),
}


@pytest.mark.parametrize('model_name', AFT_MODELS)
@pytest.mark.parametrize('check', list(CHECKS))
def test_timm_model_checks(upstream: ModuleType, check: str, model_name: str) -> None:
    CHECKS[check](upstream, model_name)


# timm's prune contract prunes and re-runs the model at every block (timm keeps it out of its own CI as slow)
@pytest.mark.parametrize('model_name', AFT_MODELS)
def test_timm_prune_intermediate_layers_contract(upstream: ModuleType, model_name: str) -> None:
    _run(upstream.test_prune_intermediate_layers_contract, model_name)


@pytest.mark.parametrize('model_name', AFT_MODELS_WITH_TAGS)
def test_timm_default_cfgs(upstream: ModuleType, model_name: str) -> None:
    """timm's cfg test for every tag: spatial variant for AFT-conv, the ViT-family (non-spatial) one otherwise."""
    cfg_device = 'meta'
    if any(fnmatch.fnmatch(model_name, pattern) for pattern in NON_SPATIAL):
        _run(upstream.test_model_default_cfgs_non_std, model_name, 1, cfg_device)
    else:
        _run(upstream.test_model_default_cfgs, model_name, 1, cfg_device)

