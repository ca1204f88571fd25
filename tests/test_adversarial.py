"""nbtool tried as a careful, then a hostile user would: every case is right or clearly refused.

Bad inputs, bad and foreign model files, faults, another local user, concurrent result
stores. Each case asserts either the right answer (checked against Keras or the
interpreter) or a refusal that names the thing, what was expected and the fix; and that
nothing computed is lost and nothing is left behind.
"""

from __future__ import annotations

import numpy as np
import pytest

from nbtool.errors import NbtoolError


# == model files: foreign, changed, untrusted =================================================


# == the cluster: another user, addresses, lifecycle ===========================================


# == runs and result stores ====================================================================


# == inputs and the magics =====================================================================
