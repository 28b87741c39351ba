"""`augkd compare` shares the teacher, Module 1 and Module 2 between methods through its stage cache; a
method inside compare must end exactly where the same method run alone ends (plots on, the default)."""
import pytest

from augkd.cli import main
from tests.test_resume import SMOKE, assert_same_weights

# In this order compare trains the teacher, Module 1 and Module 2 for augkd and loads them from its cache
# for the others: kd the teacher, dfkd and no-anchor Module 1, no-mixup Module 1 and Module 2. (official
# shares only the teacher, ce does not train with it.)
METHODS = ("augkd", "kd", "dfkd", "no-anchor", "no-mixup")


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    argv = ["compare", "--quiet", "--device", "cpu", "--seeds", "1", "--methods", ",".join(METHODS),
            "--out", str(out), *SMOKE]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize("method", METHODS)
def test_compare_matches_the_standalone_run(compare_dir, tmp_path, method):
    alone = tmp_path / method
    assert main(["run", "--quiet", "--device", "cpu", "--method", method, "--out", str(alone), *SMOKE]) == 0
    assert_same_weights(compare_dir / "seed0" / method / "student.pt", alone / "student.pt")
