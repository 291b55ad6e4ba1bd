"""Shared test hygiene: the runner sets process-wide fp4.linear switches (quant backend, real FP8)
from the hardware config; restore them after every test so results never depend on test order."""
import pytest

import fp4.linear as linear


@pytest.fixture(autouse=True)
def _restore_fp4_linear_settings():
    saved = dict(linear._SETTINGS)
    yield
    linear._SETTINGS.clear()
    linear._SETTINGS.update(saved)
