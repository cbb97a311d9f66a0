"""Secret scrubbing: every secret of the corpus redacted, ordinary text byte-identical."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil import _native
from sigil.core.config import Settings, load_settings
from sigil.telemetry.sanitization import REDACTED, LogSanitizer, sanitizer_from_settings

# (name, text, the secret part that must be gone). Shapes follow each provider's
# documented format; none of these is a live credential.
SECRETS: list[tuple[str, str, str]] = [
    ("aws_access_key", "using key AKIAIOSFODNN7EXAMPLE for s3", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_sts_key", "creds ASIAY34FZKBOKMUTVV7A expire soon", "ASIAY34FZKBOKMUTVV7A"),
    (
        "aws_secret_ini",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "aws_secret_env",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI",
    ),
    ("github_ghp", "push with ghp_16C7e42F292c6912E7710c838347Ae178B4a", "16C7e42F292c69"),
    ("github_gho", "gho_16C7e42F292c6912E7710c838347Ae178B4a", "16C7e42F292c69"),
    ("github_ghu", "ghu_16C7e42F292c6912E7710c838347Ae178B4a", "16C7e42F292c69"),
    ("github_ghs", "GITHUB_TOKEN=ghs_16C7e42F292c6912E7710c838347Ae178B4a", "16C7e42F292c69"),
    (
        "github_ghr",
        "ghr_1B4a2e77838347a7E420ce178F2E7c6912E169246c34E1ccbF66C46812d16D5B1A9Dc86A1498",
        "1B4a2e77838347a7",
    ),
    (
        "github_fine_grained",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123",
        "11ABCDEFG0123456789",
    ),
    ("gitlab", "clone with glpat-Ab3dEf9hIjK1mNoPqRsT", "Ab3dEf9hIjK1mNoPqRsT"),
    ("slack_bot", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "AbCdEfGhIjKl"),
    (
        "slack_user",
        "xoxp-123456789012-123456789012-123456789012-0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123",
    ),
    ("slack_app", "xoxa-2-123456789012-abcdefABCDEF", "abcdefABCDEF"),
    ("slack_refresh", "xoxr-123456789012-abcdefghijKL", "abcdefghijKL"),
    (
        "slack_webhook",
        "posting to https://hooks.slack.com/services/T0A1B2C3D/B0A1B2C3D/"
        "aBcDeFgHiJkLmNoPqRsTuVwX ok",
        "aBcDeFgHiJkLmNoPqRsTuVwX",
    ),
    (
        "jwt",
        "id_token: eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6Ikpv"
        "aG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ),
    (
        "openai_legacy",
        "OPENAI_API_KEY=sk-abcdefghijklmnopqrstT3BlbkFJabcdefghijklmnopqrst",
        "T3BlbkFJabcdef",
    ),
    (
        "openai_in_prose",
        "calling with sk-abcdefghijklmnopqrstT3BlbkFJabcdefghijklmnopqrst now",
        "T3BlbkFJabcdef",
    ),
    (
        "openai_project",
        "key sk-proj-Ab3_dEf-GhIjKlMnOpQrStUvWxYz0123456789abcdEFGH-x_Y",
        "GhIjKlMnOpQrStUvWxYz",
    ),
    (
        "openai_service_account",
        "sk-svcacct-Ab3_dEfGhIjKlMnOpQrStUvWxYz0123456789",
        "Ab3_dEfGhIjKlMnOpQrSt",
    ),
    (
        "anthropic",
        "x-api-key: sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-AbCdEfGhIjKlMnOp-AAAA",
        "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    ),
    ("stripe", "charge with sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc"),
    ("google", "maps key AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI", "SyDdI0hCZtE6vySjMm"),
    ("huggingface", "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "abcdefghijklmnopqrst"),
    (
        "pem_rsa",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\nabc==\n"
        "-----END RSA PRIVATE KEY-----",
        "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi",
    ),
    (
        "pem_openssh",
        "key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAE\n"
        "-----END OPENSSH PRIVATE KEY-----\nthanks",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAE",
    ),
    (
        "pem_truncated",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC (cut)",
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    ),
    ("url_password", "postgres://admin:s3cr3t-P4ss@db.internal:5432/app", "s3cr3t-P4ss"),
    ("url_password_with_at", "redis://:p@ssw0rd@cache:6379/0", "p@ssw0rd"),
    ("url_password_https", "GET https://bob:hunter2hunter2@example.com/x", "hunter2hunter2"),
    ("bearer", "Authorization: Bearer abcdef0123456789abcdef", "abcdef0123456789abcdef"),
    ("bearer_lowercase", "header bearer Zm9vYmFyYmF6cXV4MTIz", "Zm9vYmFyYmF6cXV4MTIz"),
    ("basic_auth", "Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA"),
    ("password_pair", "login failed with password=hunter2", "hunter2"),
    ("password_json", '{"password": "correct horse battery staple"}', "horse battery"),
    ("password_python_repr", "{'password': 'hunter2'}", "hunter2"),
    ("password_escaped_json", '{\\"db_password\\": \\"hunter2\\"}', "hunter2"),
    ("passwd_upper", "PASSWD: swordfish", "swordfish"),
    ("password_flag", "ran tool --password swordfish --verbose", "swordfish"),
    ("client_secret", "client_secret=abcDEF123ghi", "abcDEF123ghi"),
    ("secret_yaml", "secret: topsecretvalue", "topsecretvalue"),
    ("token_pair", "token=abc123def456ghi", "abc123def456ghi"),
    ("access_token_query", "GET /cb?access_token=ya29a0AfH6SMBx3&state=1", "ya29a0AfH6SMBx3"),
    ("api_key_pair", "api_key=12345abcde", "12345abcde"),
    ("api_key_header", "X-Api-Key: 0f3c9a7e5d1b", "0f3c9a7e5d1b"),
    (
        "azure_storage_key",
        "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlC"
        "DXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;EndpointSuffix=core.windows.net",
        "Eby8vdM02xNOcqFlqUwJPLlmEtlC",
    ),
    (
        "azure_service_bus",
        "Endpoint=sb://acme.servicebus.windows.net/;SharedAccessKeyName=root;"
        "SharedAccessKey=q1w2E3r4T5y6U7i8O9p0AsDfGhJkLzXcVbNm1234567=",
        "q1w2E3r4T5y6U7i8O9p0",
    ),
    (
        "azure_sas_signature",
        "GET https://acme.blob.core.windows.net/c/b?sv=2022-11-02&ss=b&srt=o&sp=r"
        "&sig=Xy7kP0qLm3Rt9VbN2cW5eA8sD1fG4hJ6kL0zX3cV5bN%3D ok",
        "Xy7kP0qLm3Rt9VbN2cW5eA8sD1fG4hJ6kL0zX3cV5bN",
    ),
    (
        "azure_ad_client_secret",
        "client created with value Abc8Q~xYz0123456789AbCdEfGhIjKlMnOpQrStU today",
        "xYz0123456789AbCdEfGhIj",
    ),
    (
        "generic_high_entropy_pair",
        "SENTRY_DSN_PRIVATE=Zx9Qm2Lp7Rt4Vb8Nc1Wk5Hs3Jd6Fg0Ya",
        "Zx9Qm2Lp7Rt4Vb8Nc1Wk5Hs3Jd6Fg0Ya",
    ),
    (
        "generic_high_entropy_yaml",
        "signing: 7fGh2KqP9xLm4RtZ8vBn3WcY6dJs1AeU0oIp",
        "7fGh2KqP9xLm4RtZ8vBn3WcY6dJs1AeU0oIp",
    ),
    (
        "stripe_webhook_secret",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLVtd",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLVtd",
    ),
    ("stripe_restricted", "rk_live_51H8aBcDeFgHiJkLmNoPqRsTu", "51H8aBcDeFgHiJkLmNoPqRsTu"),
    (
        "slack_app_token",
        "xapp-1-A0123456789-1234567890123-abcdef0123456789abcdef0123456789",
        "abcdef0123456789abcdef",
    ),
    ("visa_spaced", "card 4111 1111 1111 1111 charged", "4111 1111 1111 1111"),
    ("visa_plain", "card number 4111111111111111.", "4111111111111111"),
    ("mastercard_dashed", "pay 5555-5555-5555-4444 now", "5555-5555-5555-4444"),
    ("amex_grouped", "amex 3782 822463 10005", "3782 822463 10005"),
    ("amex_plain", "amex 378282246310005", "378282246310005"),
]

# Text that must come out byte-identical: what sigil's own logs are made of.
ORDINARY: list[str] = [
    "Retrieved 5 relevant memories",
    "Consumed 150 tokens (total 12,500 of 256,000)",
    "Intent classified as: lead_analysis",
    "token: 512",
    "max_tokens=4096 prompt_tokens=1200 completion_tokens=300",
    "bos_token: <s> eos_token=</s> pad_token: [PAD]",
    "tokens: 150, token_count=42, token_type: bearer",
    "request 550e8400-e29b-41d4-a716-446655440000 done",
    "uuid=123e4567-e89b-12d3-a456-426614174000",
    "2026-01-11T10:15:32.123456+00:00",
    "2026-01-11T10:15:32.123456",
    "ts=1736590532123456 ns=1736590532123456789 ms=1736590532123",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "hash=d41d8cd98f00b204e9800998ecf8427e commit 4111111111111111abcdef1234567890abcdef12",
    "mail bob@example.com about invoice 4411",
    "tokens 4000 1000 2000 3000 5000",
    "phone +1 555 123 4567",
    "price 1234567890123.45 and 0.4111111111111111",
    "order id 1234567890123456",
    "1234-5678-9012-3456 is not a card",
    "5555 5555 5555 4445 fails Luhn",
    "IBAN DE89 3704 0044 0532 0130 00",
    "http://example.com:8080/path?email=a@b.com",
    "ssh://git@github.com/org/repo.git",
    "user@host:~$ ls",
    "Bearer of bad news",
    "bearer token missing",
    "task-1234567890123456789012 done",
    "sk-learn-pipeline-version-2024-final",
    "disk-abcdefghijklmnopqrstuvwxyz",
    "Asia/Tokyo timezone",
    "password reset requested for user 42",
    "the secret of success",
    "auth: ok",
    "auth=required",
    "credentials: none",
    "PWD=/home/user/project",
    "key=value monkey=banana api_version=2024-01-01",
    "latency 1100ms (warning at 5000ms)",
    "eyJ is a prefix",
    "ghp_short glpat-short xoxb-short sk-short",
    "sessions/test-1/execution.jsonl",
    "budget 256,000 tokens; 4111 used",
    "card ending 1111",
    # Look-alikes of the generic high-entropy rule: hashes, ids, paths, versions.
    "commit=4bf92f3577b34da6a3ce929d0e0e4736 trace_id: 4bf92f3577b34da6a3ce929d0e0e4736",
    "digest=sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "path=/home/user/Projects/Sigil2024/Reports/Q3Summary.md",
    "model=gpt-4o-2024-08-06 model: claude-3-5-sonnet-20241022",
    "intent: lead_analysis_with_CompanyResearch2024",
    "component=ReasoningStepWithRetries2 attempt=3",
    "sig=short sv=2022-11-02",
    "AccountName=acme;EndpointSuffix=core.windows.net",
    "the Q~ operator",
    "whsec_short rk_live_short",
    "url=https://docs.example.com/GettingStarted/Install2024",
    '{"timestamp":"2026-01-11T10:15:33.234567","event_type":"step_complete","tokens":50}',
    # Accents, em and en dashes, curly quotes, Arabic-Indic digits (not card digits).
    "\u00dcn\u00efc\u00f6d\u00e9 \u2014 dashes \u2013 \u201cquotes\u201d "
    "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660\u0661\u0662\u0663\u0664\u0665\u0666",
    "",
]


@pytest.fixture(scope="module")
def sanitizer() -> LogSanitizer:
    return LogSanitizer()


@pytest.mark.parametrize(("name", "text", "secret"), SECRETS, ids=[s[0] for s in SECRETS])
def test_every_secret_is_redacted(
    sanitizer: LogSanitizer, name: str, text: str, secret: str
) -> None:
    cleaned = sanitizer.sanitize_string(text)
    assert secret not in cleaned, cleaned
    assert "***" in cleaned
    assert sanitizer.sanitize_string(cleaned) == cleaned  # idempotent


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_untouched(sanitizer: LogSanitizer, text: str) -> None:
    assert sanitizer.sanitize_string(text) == text


def test_redaction_keeps_the_context(sanitizer: LogSanitizer) -> None:
    assert (
        sanitizer.sanitize_string("postgres://admin:pw@db:5432/app")
        == f"postgres://admin:{REDACTED}@db:5432/app"
    )
    assert sanitizer.sanitize_string('{"password": "a b"}') == f'{{"password": "{REDACTED}"}}'
    assert sanitizer.sanitize_string("Bearer abcdef0123456789") == f"Bearer {REDACTED}"
    assert (
        sanitizer.sanitize_string("api_key=sk-abcdefghijklmnopqrstuvwxyz0123")
        == "api_key=***API_KEY***"
    )
    assert sanitizer.sanitize_string("card 4111111111111111") == "card ***CARD_NUMBER***"


def test_secret_inside_a_serialised_event(sanitizer: LogSanitizer) -> None:
    line = (
        '{"event_type":"step_error","message":"401 for key sk-proj-abcdefghijklmnopqrstuvwx'
        'yz0123","metadata":{"url":"https://u:pw1@api.example.com"}}'
    )
    cleaned = sanitizer.sanitize_string(line)
    assert "abcdefghijklmnopqrstuvwxyz0123" not in cleaned
    assert "pw1" not in cleaned
    assert cleaned.startswith('{"event_type":"step_error"')


def test_dicts_lists_and_tuples_recursively(sanitizer: LogSanitizer) -> None:
    data: dict[str, Any] = {
        "latency_ms": 1100,
        "intent": "lead_analysis",
        "nested": {"headers": {"Authorization": "Bearer abcdef0123456789abcdef"}},
        "list": ["ok", "password=hunter2", 5, {"k": "AKIAIOSFODNN7EXAMPLE"}],
        "tuple": ("fine", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
        "ok": None,
    }
    cleaned = sanitizer.sanitize_dict(data)
    assert cleaned["latency_ms"] == 1100 and cleaned["intent"] == "lead_analysis"
    assert cleaned["nested"]["headers"]["Authorization"] == REDACTED
    assert cleaned["list"][0] == "ok" and cleaned["list"][2] == 5
    assert "hunter2" not in cleaned["list"][1]
    assert cleaned["list"][3] == {"k": "***AWS_ACCESS_KEY***"}
    assert isinstance(cleaned["tuple"], tuple)
    assert cleaned["tuple"] == ("fine", "***GITHUB_TOKEN***")
    # The input is never mutated.
    assert data["list"][1] == "password=hunter2"
    assert data["nested"]["headers"]["Authorization"].startswith("Bearer abc")


def test_credential_named_keys_are_redacted_whatever_the_value(sanitizer: LogSanitizer) -> None:
    data = {
        "password": "x",
        "api_key": "plain",
        "OPENAI_API_KEY": "whatever",
        "client_secret": "abc",
        "aws_secret_access_key": "abc",
        "refresh_token": "abc",
        "credentials": "abc",
        "token": "Hello",  # a text token in an LLM stream, not a credential
        "max_tokens": "4096",
        "secret_name": "prod-db",
        "password_hint": "the usual",
        "api_key_env": "OPENAI_API_KEY",
        "empty_password": "",
        "password_count": 3,
    }
    cleaned = sanitizer.sanitize_dict(data)
    for key in ("password", "api_key", "OPENAI_API_KEY", "client_secret"):
        assert cleaned[key] == REDACTED, key
    for key in ("aws_secret_access_key", "refresh_token", "credentials"):
        assert cleaned[key] == REDACTED, key
    for key in ("token", "max_tokens", "secret_name", "password_hint", "api_key_env"):
        assert cleaned[key] == data[key], key
    assert cleaned["empty_password"] == "" and cleaned["password_count"] == 3


def test_unchanged_containers_are_returned_as_is(sanitizer: LogSanitizer) -> None:
    data = {"a": "plain", "b": [1, "two", ("three",)], "c": {"d": "e"}}
    assert sanitizer.sanitize_dict(data) is data
    text = "nothing to hide"
    assert sanitizer.sanitize_string(text) is text
    changed = {"a": "plain", "b": "password=x"}
    result = sanitizer.sanitize_dict(changed)
    assert result is not changed and list(result) == ["a", "b"]


@dataclass(slots=True)
class Entry:
    timestamp: str
    session_id: str
    event_type: str
    component: str
    message: str
    tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    seq: int | None = None


def test_sanitize_entry_copies_and_keeps_other_fields(sanitizer: LogSanitizer) -> None:
    entry = Entry(
        "2026-01-11T10:15:32+00:00",
        "s1",
        "step_error",
        "reasoning",
        "auth failed for token=abc123def456ghi",
        7,
        {"url": "redis://:pw@h:1"},
        seq=41,
    )
    cleaned = sanitizer.sanitize_entry(entry)
    assert cleaned is not entry
    assert "abc123def456ghi" not in cleaned.message
    assert cleaned.metadata == {"url": f"redis://:{REDACTED}@h:1"}
    assert (cleaned.seq, cleaned.tokens, cleaned.session_id) == (41, 7, "s1")
    assert entry.message.endswith("abc123def456ghi")


def test_additional_patterns_apply_case_insensitively() -> None:
    sanitizer = LogSanitizer(
        additional_patterns=[(r"[\w.+-]+@[\w-]+\.[\w.]+", "***EMAIL***"), ("acme-\\d+", "ACME")]
    )
    assert (
        sanitizer.sanitize_string("mail Bob@Example.com re ACME-42") == "mail ***EMAIL*** re ACME"
    )
    assert sanitizer.sanitize_dict({"to": "bob@example.com"}) == {"to": "***EMAIL***"}


def test_sanitizer_from_settings(tmp_path: Any) -> None:
    assert isinstance(sanitizer_from_settings(Settings()), LogSanitizer)
    (tmp_path / "config.yaml").write_text(
        "logging:\n  additional_patterns: [['internal-[0-9]+', '***INTERNAL***']]\n"
    )
    with_patterns = sanitizer_from_settings(load_settings(env={"SIGIL_HOME": str(tmp_path)}))
    assert with_patterns is not None
    assert with_patterns.sanitize_string("host internal-7") == "host ***INTERNAL***"
    (tmp_path / "config.yaml").write_text("logging:\n  sanitize_logs: false\n")
    assert sanitizer_from_settings(load_settings(env={"SIGIL_HOME": str(tmp_path)})) is None


@pytest.mark.parametrize(
    "blob",
    [
        "a_" * 300_000,  # long identifier chains (base64url, snake_case)
        "password=" * 60_000,
        "1234 " * 120_000,
        "eyJ" + "a" * 600_000,
        "x://a:" + "b" * 600_000,
        "-----BEGIN PRIVATE KEY-----" * 20_000,
    ],
    ids=["chains", "pairs", "digits", "jwt-head", "url-head", "pem-heads"],
)
def test_large_adversarial_strings_stay_linear(sanitizer: LogSanitizer, blob: str) -> None:
    started = time.perf_counter()
    sanitizer.sanitize_string(blob)
    assert time.perf_counter() - started < 2.0


# -- the native rules (rust/sanitize.rs) against the documented Python reference ------

#: Text around and between the shapes: separators, quotes, names the rules key on.
_GLUE = [
    " ",
    "=",
    ": ",
    '"',
    "'",
    ",",
    "\n",
    "\t",
    "/",
    "@",
    "://",
    "-",
    "_",
    ".",
    "?",
    "&",
    "password",
    "token",
    "api_key",
    "Authorization: ",
    "Bearer ",
    "--token ",
    "x=",
    "AccountKey=",
    "sig=",
    "é",
    "٣",
    "\u212a",
    "0",
    "4111",
    "1234 ",
    "eyJ",
    "-----",
]
_PIECES = [text for _, text, _ in SECRETS] + [t for t in ORDINARY if t] + _GLUE


def _texts() -> list[str]:
    """The corpus, every shape inside text, and shapes glued to each other."""
    texts = [text for _, text, _ in SECRETS] + list(ORDINARY)
    for _, text, _ in SECRETS:
        texts += [f"x {text} y", f"key={text}", f'"{text}"', text[:-1], text + "Z", "a" + text]
    return texts


def test_native_rules_agree_with_the_reference_on_the_corpus() -> None:
    from sanitize_reference import LogSanitizer as Reference

    reference = Reference()
    for text in _texts():
        assert _native.sanitize_string(text) == reference.sanitize_string(text), text


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=12)), max_size=8))
def test_native_rules_agree_with_the_reference_on_any_mix(parts: list[str]) -> None:
    from sanitize_reference import LogSanitizer as Reference

    text = "".join(parts)
    assert _native.sanitize_string(text) == Reference().sanitize_string(text)


#: Pieces around the key-value rule's separator, which the native rules skip in
#: ASCII text where no ':' or '=' follows one of its names (past blanks and an
#: optional, maybe escaped, quote), even after other rules put marks in.
_KV_PIECES = [
    "password",
    "passwd",
    "PassPhrase",
    "pwd",
    "secret",
    "Secret_Key",
    "api-key",
    "apikey",
    "token",
    "auth",
    "Authorization",
    "credentials",
    "keyword",
    "author",
    ":",
    "=",
    " ",
    "\t",
    '"',
    "'",
    "\\",
    "hunter2x9",
    "s3cr3t",
    "sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789",
    "https://admin:s3cr3t-P4ss@api.example.com",
    "https://token:",
    "@host",
    "Bearer 0123456789abcdef0123456789abcdef",
    "AKIAIOSFODNN7EXAMPLE",
    "***REDACTED***",
    "é",
]


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_KV_PIECES), max_size=10))
def test_native_rules_agree_with_the_reference_around_key_value_separators(
    parts: list[str],
) -> None:
    from sanitize_reference import LogSanitizer as Reference

    text = "".join(parts)
    assert _native.sanitize_string(text) == Reference().sanitize_string(text)


#: Pieces around the bounds of the native one-pass pre-check (which skips the
#: rule set for ASCII text without ':', '=', "--", 13 digits or a run of 12
#: token characters): runs of 11 and 12, 12 and 13 digits, lone dashes.
_BOUND_PIECES = [
    "Bearer ",
    "bearer\t",
    "abcdef12345",
    "abcdef123456",
    "eyJabcdefghij",
    "eyJabcdefgh",
    ".",
    "~",
    "+",
    "/",
    "-",
    "_",
    " ",
    "123456789012",
    "1",
    "4111 1111 1111 1111",
    "sk-",
    "xoxb-",
    "Q~",
    "3Q~",
    "AKIA",
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_BOUND_PIECES), max_size=10))
def test_native_rules_agree_with_the_reference_at_the_pre_check_bounds(parts: list[str]) -> None:
    from sanitize_reference import LogSanitizer as Reference

    text = "".join(parts)
    assert _native.sanitize_string(text) == Reference().sanitize_string(text)


def test_a_secret_after_a_newer_unicode_letter_is_redacted() -> None:
    """U+13460 is a letter only from Unicode 16.0 on: the reference's ``\\b``
    (Python's ``str.isalnum()`` of its own Unicode database) sees a boundary
    before the key, so the native rules must redact it too."""
    from sanitize_reference import LogSanitizer as Reference

    text = "\U00013460sk-svcacct-" + "Ab3dEfGhIjKlMnOpQrStUvWx"
    assert Reference().sanitize_string(text) == "\U00013460***API_KEY***"
    assert _native.sanitize_string(text) == Reference().sanitize_string(text)


def test_word_characters_are_pythons_on_every_code_point() -> None:
    """The word-boundary rule before a secret, checked on every code point
    against the reference's: Python's ``\\w`` is ``str.isalnum()`` or ``_``."""
    import re as _re

    body = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
    redacted = "***GITHUB_TOKEN***"
    wrong = []
    for code in range(0x80, 0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        word = _re.match(r"\w", char) is not None
        got = _native.sanitize_string(char + body)
        if (got == char + redacted) == word:
            wrong.append(f"U+{code:04X}")
    assert not wrong, f"{len(wrong)} code points disagree, e.g. {wrong[:10]}"


_TEXTS = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=12)), max_size=6).map(
    "".join
)
_KEYS = st.one_of(
    st.sampled_from(["password", "api_key", "token", "Authorization", "model", "error", "x"]),
    st.text(max_size=10),
)
_VALUES = st.recursive(
    st.one_of(
        _TEXTS,
        st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(_TEXTS, st.dictionaries(_KEYS, _VALUES, max_size=6), st.integers(0, 1 << 53)),
        min_size=1,
        max_size=5,
    )
)
def test_the_written_line_is_orjson_of_the_reference_sanitised_event(
    events: list[tuple[str, dict[str, Any], int]],
) -> None:
    """Byte for byte: the writer's line with ``sanitize=True`` (the default
    logger's path: orjson metadata, scrubbed natively) equals orjson's
    serialisation of the event scrubbed by the reference."""
    import tempfile
    from pathlib import Path

    from sanitize_reference import LogSanitizer as Reference

    reference = Reference()
    timestamp = "2026-11-29T04:00:00.000000+00:00"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        writer = _native.AppendWriter(path, session_id="s", sanitize=True)
        for message, metadata, tokens in events:
            writer.write_event("s", "step", "c", message, tokens, orjson.dumps(metadata), timestamp)
        writer.close()
        lines = path.read_bytes().splitlines()
    expected = [
        orjson.dumps(
            {
                "timestamp": timestamp,
                "session_id": "s",
                "event_type": "step",
                "component": "c",
                "message": reference.sanitize_string(message),
                "tokens": tokens,
                "metadata": reference.sanitize_dict(metadata),
                "seq": seq,
            }
        )
        for seq, (message, metadata, tokens) in enumerate(events)
    ]
    assert lines == expected


def test_sensitive_keys_agree_with_the_reference() -> None:
    from sanitize_reference import _SENSITIVE_KEY

    keys = [
        "password",
        "api_key",
        "OPENAI_API_KEY",
        "client_secret",
        "x.y-access_key_id",
        "token",
        "max_tokens",
        "secret_name",
        "password_hint",
        "api_key_env",
        "Set-Cookie",
        "auth_token",
        "AUTHORIZATION",
        "credential",
        "pwd",
        "my_pwd_x",
        "",
        "pass",
    ]
    for key in keys:
        assert _native.is_sensitive_key(key) == (_SENSITIVE_KEY.fullmatch(key) is not None), key


def test_the_writer_scrubs_metadata_as_sanitize_dict_does(tmp_path: Any) -> None:
    """The writer's native pass over the serialised metadata equals the
    documented dict walk: values scrubbed, credential-named keys redacted, keys kept."""
    from sanitize_reference import LogSanitizer as Reference

    metadata: dict[str, Any] = {
        "password": "x",
        "empty_password": "",
        "token": "Hello",
        "nested": {"headers": {"Authorization": "Bearer abcdef0123456789abcdef"}},
        "list": ["ok", "password=hunter2", 5, {"k": "AKIAIOSFODNN7EXAMPLE"}, ['a"b\n']],
        "escaped": 'quote " and \\ and \u00e9 sk-proj-abcdefghijklmnopqrstuvwxyz0123',
        "api_key": ["in", "a", "list"],
        "corpus": [text for _, text, _ in SECRETS] + list(ORDINARY),
        "n": 1.5,
        "t": True,
        "z": None,
    }
    writer = _native.AppendWriter(tmp_path / "log.jsonl", session_id="s", sanitize=True)
    writer.write_event(
        "s",
        "step_error",
        "c",
        "key sk-proj-abcdefghijklmnopqrstuvwxyz0123",
        0,
        orjson.dumps(metadata),
    )
    writer.close()
    event = orjson.loads((tmp_path / "log.jsonl").read_bytes())
    reference = Reference()
    assert event["metadata"] == reference.sanitize_dict(metadata)
    assert event["message"] == "key ***API_KEY***"


# -- every file sigil writes, end to end (issue 11 item 9) -----------------------------


def _files_under(root: Any) -> dict[str, bytes]:
    """Every regular file under ``root``, archives unpacked (name -> bytes)."""
    import tarfile
    from pathlib import Path

    out: dict[str, bytes] = {}
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        out[str(path)] = path.read_bytes()
        if path.name.endswith(".tar.gz"):
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        out[f"{path}!{member.name}"] = extracted.read()
    return out


@pytest.mark.slow
def test_no_secret_reaches_any_file_sigil_writes(sigil_home: Any) -> None:
    """A failing step's error text and the task hold secrets: none of them reaches
    the log, errors.jsonl, tokens.json, metrics.json or the session's archive."""
    import os

    from conftest import run_cli
    from orchestrate_steps import LEAKED_SECRETS

    sigil_home.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text(
        "errors:\n  max_retries: 1\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
        "pipeline:\n  steps:\n    reasoning: orchestrate_steps:LeakyReasoning\n"
    )
    bearer = "0123456789abcdef0123456789abcdef"
    api_key = "fedcba9876543210fedcba9876543210"
    task = f"Analyze Acme with Bearer {bearer} and api_key: {api_key}"
    proc = run_cli(sigil_home, "orchestrate", "--task", task, "--session", "leak-1", "--json")
    assert proc.returncode == 1, proc.stderr
    session = sigil_home / "logs" / "sessions" / "leak-1"
    assert (session / "errors.jsonl").is_file()
    secrets = [*LEAKED_SECRETS, bearer, api_key]

    def leaks(files: dict[str, bytes]) -> list[tuple[str, str]]:
        return [(name, s) for name, data in files.items() for s in secrets if s.encode() in data]

    assert leaks(_files_under(session)) == []

    # Archived, the session keeps no secret either.
    old = time.time() - 40 * 86400
    for path in [*session.rglob("*"), session]:
        os.utime(path, (old, old), follow_symlinks=False)
    archived = run_cli(sigil_home, "logs", "archive")
    assert archived.returncode == 0, archived.stderr
    archives = _files_under(sigil_home / "logs" / "archive")
    assert any(name.endswith("errors.jsonl") for name in archives)
    assert leaks(archives) == []
