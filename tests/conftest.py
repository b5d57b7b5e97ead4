"""Suite-wide set-up: the suite's kernels and tuning decisions go to a cache of their own
(``$DFPGEN_TEST_CACHE_DIR``, default ``platformdirs.user_cache_dir("dfpgen-tests")``), so
``make test`` never adds entries to, or verifies and clears, the user's ``dfpgen`` cache. Set
before any test imports dfpgen; tests that need an empty cache make their own under tmp_path."""
from __future__ import annotations

import os

import platformdirs

os.environ["DFPGEN_CACHE_DIR"] = (os.environ.get("DFPGEN_TEST_CACHE_DIR")
                                  or platformdirs.user_cache_dir("dfpgen-tests"))
