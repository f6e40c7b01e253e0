import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings

# A few hundred examples in the default suite; HYPOTHESIS_PROFILE=thorough runs 10,000. The seeding fixture
# below is function-scoped on purpose (once per test, not per example).
_checks = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("default", max_examples=300, deadline=None, suppress_health_check=_checks)
settings.register_profile("thorough", max_examples=10_000, deadline=None, suppress_health_check=_checks)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it (ACFX_TEST_SEED to vary it)."""
    seed = int(os.environ.get("ACFX_TEST_SEED", "0"))
    random.seed(seed)
    torch.manual_seed(seed)
