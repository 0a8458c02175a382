"""Flag values out of their declared ranges stop the service at start with one line
naming the flag (issue 23 cases 6 and 9)."""

import pytest
from pydantic import ValidationError

from extproc.cli import main
from extproc.config import describe_error, load_settings


@pytest.mark.parametrize("weights", ["nan,2,3,4,5", "1,2,inf,4,5", "1,2,3,4,0", "1e9,1,1,1,1"])
def test_criticality_weights_must_be_finite_and_in_range(weights: str) -> None:
    """`min()` skipped NaN: shares 60/40/20 became 2/79/39 (nan) or 120/0/0 (inf)."""
    with pytest.raises(ValidationError) as error:
        load_settings({"criticality_weights": weights}, use_env=False)
    line = describe_error(error.value)
    assert "--criticality-weights" in line
    assert "from 0.001 to 1000" in line


def test_serve_refuses_an_unusable_dns_name_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It printed a 58-line traceback from the first lookup."""
    assert main(["serve", "--endpoints-dns", "a..b:80"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "--endpoints-dns" in lines[0]
    assert "'a..b' is not a DNS name" in lines[0]


@pytest.mark.parametrize("listen", ["::1:9002", "[::1:9002", "::1]:9002", "[]:9002"])
def test_an_ipv6_listen_address_needs_its_brackets(listen: str) -> None:
    """'::1:9002' was taken as host '::1', port 9002: a guess, not what it says."""
    with pytest.raises(ValidationError) as error:
        load_settings({"listen": listen}, use_env=False)
    assert "--listen" in describe_error(error.value)


def test_a_bracketed_ipv6_listen_address_is_host_and_port() -> None:
    assert load_settings({"listen": "[::1]:9002"}, use_env=False).listen == "[::1]:9002"
