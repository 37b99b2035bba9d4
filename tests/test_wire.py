"""Wire format: every bad input raises WireFormatError with the right reason; round trips are exact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stream_asd import wire
from stream_asd.errors import AsdError, WireFormatError
from stream_asd.wire import (
    AlertRecord, ChunkHeader, ScoreRecord, decode_chunk, dlq_headers, encode_chunk, float_to_pcm16,
    pcm16_to_float,
)


def make_header(**kw) -> ChunkHeader:
    base = dict(device_id="fan-00", machine_type="fan", seq=7, capture_ns=1_700_000_000_123_456_789,
                producer_id="prod-1")
    base.update(kw)
    return ChunkHeader(**base)


def pcm_1s(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32768, size=16_000, dtype=np.int16)


@pytest.fixture
def msg():
    key, value, headers = encode_chunk(make_header(), pcm_1s())
    return key, value, headers


def set_header(headers, name, value):
    return [(k, value if k == name else v) for k, v in headers]


def drop_header(headers, name):
    return [(k, v) for k, v in headers if k != name]


def reason_of(key, value, headers, **kw) -> str:
    with pytest.raises(WireFormatError) as info:
        decode_chunk(key, value, headers, **kw)
    assert info.value.reason in wire.REASONS
    assert isinstance(info.value, AsdError)
    return info.value.reason


# ---------------------------------------------------------------- round trips

def test_encode_decode_bit_exact_and_header_fields(msg):
    key, value, headers = msg
    pcm = pcm_1s()
    assert key == b"fan-00"
    assert value == pcm.astype("<i2").tobytes() and len(value) == 32_000
    chunk = decode_chunk(key, value, headers)
    assert np.array_equal(chunk.pcm, pcm) and chunk.pcm.dtype == np.int16
    assert chunk.header == make_header()
    assert chunk.device_id == "fan-00" and chunk.seq == 7 and chunk.n_samples == 16_000
    h = dict(headers)
    assert h["content-type"] == b"audio/L16;rate=16000;channels=1"
    assert h["ce_id"] == b"fan-00/7" and h["ce_specversion"] == b"1.0"
    assert h["ce_time"].startswith(b"2023-11-14T22:13:20.123456")


def test_decode_accepts_every_client_header_shape(msg):
    key, value, headers = msg
    as_dict = {k: v for k, v in headers}
    as_bytes_names = [(k.encode(), v) for k, v in headers]
    as_str_values = [(k, v.decode()) for k, v in headers]
    for shape in (as_dict, as_bytes_names, as_str_values, tuple(headers)):
        assert np.array_equal(decode_chunk(key.decode(), value, shape).pcm, pcm_1s())


def test_float_round_trip_is_exact_for_pcm16():
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    f = pcm16_to_float(pcm)
    assert f.dtype == np.float32 and f.min() == -1.0 and f.max() < 1.0
    assert np.array_equal(float_to_pcm16(f), pcm)
    # clipping instead of wrap-around
    assert float_to_pcm16(np.array([1.5, -2.0, 0.99999])).tolist() == [32767, -32768, 32767]


def test_score_and_alert_records_round_trip():
    rec = ScoreRecord(device_id="pump-3", machine_type="pump", window_id=wire.window_id("pump-3", 10, 19),
                      first_seq=10, last_seq=19, window_start_ns=1, window_end_ns=10_000_000_001, score=1.25,
                      scores={"fusion": 1.0, "statistics": 1.5}, threshold=2.0, is_anomaly=False,
                      model_version="v3", scored_at_ns=5, capture_to_score_s=0.42, flags=["gap_zero_filled"])
    data = rec.to_json()
    assert json.loads(data)["schema"] == "asd.score/1"
    assert ScoreRecord.from_json(data) == rec
    assert ScoreRecord.from_json(data.decode()) == rec
    assert rec.window_id == "pump-3:10-19"
    alert = AlertRecord(alert_id=wire.new_alert_id(), device_id="pump-3", machine_type="pump", state="raised",
                        window_id=rec.window_id, score=3.5, threshold=2.0, windows_over=3, windows_seen=5,
                        model_version="v3", at_ns=9)
    assert AlertRecord.from_json(alert.to_json()) == alert
    assert len(alert.alert_id) == 32


# ---------------------------------------------------------------- bad chunks

def test_missing_schema_header(msg):
    key, value, headers = msg
    assert reason_of(key, value, drop_header(headers, "ce_asdschema")) == "missing_header"
    assert reason_of(key, value, None) == "missing_header"


@pytest.mark.parametrize("name", [h for h in wire.REQUIRED_HEADERS if h != "ce_asdschema"])
def test_each_missing_required_header(msg, name):
    key, value, headers = msg
    with pytest.raises(WireFormatError) as info:
        decode_chunk(key, value, drop_header(headers, name))
    assert info.value.reason == "missing_header" and name in str(info.value)


@pytest.mark.parametrize("version", [b"2", b"0", b"v1", b"99"])
def test_unknown_schema_version(msg, version):
    key, value, headers = msg
    assert reason_of(key, value, set_header(headers, "ce_asdschema", version)) == "unknown_schema_version"


@pytest.mark.parametrize("seq", [b"abc", b"1.5", b"-3", b" 7", b"+7", b"1_000", "\u0661\u0662".encode(), b"", b"\xff"])
def test_non_integer_or_negative_seq(msg, seq):
    key, value, headers = msg
    assert reason_of(key, value, set_header(headers, "ce_seq", seq)) == "bad_header"


def test_key_missing_or_mismatched(msg):
    key, value, headers = msg
    assert reason_of(None, value, headers) == "missing_key"
    assert reason_of(b"", value, headers) == "missing_key"
    assert reason_of(b"fan-01", value, headers) == "key_mismatch"


@pytest.mark.parametrize("rate", [b"44100", b"8000", b"48000"])
def test_wrong_sample_rate(msg, rate):
    key, value, headers = msg
    assert reason_of(key, value, set_header(headers, "ce_samplerate", rate)) == "wrong_sample_rate"
    # a reader that takes any rate accepts it
    chunk = decode_chunk(key, value, set_header(headers, "ce_samplerate", rate), expected_sample_rate=None)
    assert chunk.header.sample_rate == int(rate)


def test_stereo_refused(msg):
    key, value, headers = msg
    assert reason_of(key, value, set_header(headers, "ce_channels", b"2")) == "unsupported_channels"
    assert reason_of(key, value, set_header(headers, "ce_channels", b"0")) == "bad_header"


@pytest.mark.parametrize("enc", [b"pcm_f32le", b"flac", b"PCM_S16LE"])
def test_unsupported_encoding(msg, enc):
    key, value, headers = msg
    assert reason_of(key, value, set_header(headers, "ce_encoding", enc)) == "unsupported_encoding"


def test_empty_payload(msg):
    key, _, headers = msg
    assert reason_of(key, b"", headers) == "empty_payload"
    assert reason_of(key, None, headers) == "empty_payload"


def test_odd_byte_count(msg):
    key, value, headers = msg
    assert reason_of(key, value[:-1], headers) == "truncated_payload"
    assert reason_of(key, b"\x01", headers) == "truncated_payload"


def test_oversize_payload(msg):
    key, _, headers = msg
    limit = wire.DEFAULT_MAX_CHUNK_BYTES
    assert decode_chunk(key, b"\0" * limit, headers).n_samples == limit // 2  # exactly at the limit: fine
    assert reason_of(key, b"\0" * (limit + 2), headers) == "oversize_payload"
    assert reason_of(key, b"\0" * 64, headers, max_bytes=32) == "oversize_payload"


def test_garbage_header_bytes(msg):
    key, value, headers = msg
    assert reason_of(key, value, set_header(headers, "ce_deviceid", b"\xff\xfe")) == "bad_header"
    assert reason_of(key, value, set_header(headers, "ce_machinetype", b"")) == "bad_header"


@pytest.mark.parametrize("name", ["ce_capturens", "ce_seq", "ce_samplerate", "ce_channels"])
def test_huge_integer_header_is_a_wire_error_not_a_value_error(msg, name):
    # 5,000 digits: past Python's int-string limit (4,300), int() raises a plain ValueError
    key, value, headers = msg
    with pytest.raises(WireFormatError) as info:
        decode_chunk(key, value, set_header(headers, name, b"7" * 5000))
    assert info.value.reason == "integer_out_of_range" and name in info.value.detail
    assert len(str(info.value)) < 200  # the detail does not carry the digits


@pytest.mark.parametrize("name", ["ce_capturens", "ce_seq"])
def test_integer_headers_must_fit_in_int64(msg, name):
    key, value, headers = msg
    top = str(2**63 - 1).encode()
    assert getattr(decode_chunk(key, value, set_header(headers, name, top)).header,
                   "seq" if name == "ce_seq" else "capture_ns") == 2**63 - 1
    for text in (str(2**63).encode(), b"9" * 19, b"1" + b"0" * 20, str(-2**63 - 1).encode()):
        assert reason_of(key, value, set_header(headers, name, text)) == "integer_out_of_range", text
    assert reason_of(key, value, set_header(headers, name, b"-1")) == "bad_header"  # in range, below 0


def test_unexpected_failure_in_decoding_becomes_processing_error(msg):
    key, value, headers = msg
    odd = [(k, 1.5 if k == "ce_seq" else v) for k, v in headers]  # bytes(1.5) raises TypeError
    with pytest.raises(WireFormatError) as info:
        decode_chunk(key, value, odd)
    assert info.value.reason == "processing_error" and info.value.detail.startswith("TypeError: ")


def test_processing_error_detail_is_bounded():
    err = wire.processing_error(RuntimeError("x" * 100_000))
    assert err.reason == "processing_error" and err.detail.startswith("RuntimeError: xxx")
    assert len(err.detail) <= wire.DETAIL_MAX_CHARS + 40


def _header_value():
    from hypothesis import strategies as st

    digits = st.text(alphabet="0123456789", min_size=1, max_size=30)
    return st.one_of(
        st.binary(max_size=40),
        digits.map(str.encode),
        digits.map(lambda d: b"-" + d.encode()),
        st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: str(i).encode()),
        # around int64 and past int()'s 4,300-digit limit (integers() alone favours short ones)
        st.sampled_from([19, 20, 4300, 4301, 5000]).map(lambda n: b"9" * n),
        st.sampled_from([b"", b"1", b"16000", b"pcm_s16le", b"fan-00", b"\xff\xfe", "\u0661".encode()]),
    )


def test_decode_on_arbitrary_header_bytes_raises_only_wire_errors():
    """Property: whatever the header bytes, decode_chunk returns a chunk or raises
    WireFormatError with a known reason, never another exception and never processing_error
    (every way a header can be wrong has its own reason)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    key, value, headers = encode_chunk(make_header(), pcm_1s())
    names = [k for k, _ in headers]

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(changes=st.dictionaries(st.sampled_from(names), st.one_of(st.none(), _header_value()), max_size=len(names)),
           extra=st.lists(st.tuples(st.text(max_size=12), st.binary(max_size=20)), max_size=3))
    def check(changes, extra):
        hs = [(k, changes.get(k, v)) for k, v in headers if not (k in changes and changes[k] is None)] + extra
        try:
            chunk = decode_chunk(key, value, hs)
        except WireFormatError as err:
            assert err.reason in wire.REASONS and err.reason != "processing_error", err
        else:
            assert chunk.header.seq <= 2**63 - 1 and chunk.header.capture_ns <= 2**63 - 1

    check()


# ---------------------------------------------------------------- encoder refuses what readers refuse

@pytest.mark.parametrize("kw,pcm,reason", [
    ({}, np.zeros(10, dtype=np.float32), "unsupported_encoding"),
    ({}, np.zeros((2, 10), dtype=np.int16), "unsupported_channels"),
    ({"channels": 2}, np.zeros(10, dtype=np.int16), "unsupported_channels"),
    ({"encoding": "flac"}, np.zeros(10, dtype=np.int16), "unsupported_encoding"),
    ({"device_id": ""}, np.zeros(10, dtype=np.int16), "missing_key"),
    ({"seq": -1}, np.zeros(10, dtype=np.int16), "bad_header"),
    ({"seq": 2**63}, np.zeros(10, dtype=np.int16), "integer_out_of_range"),
    ({"capture_ns": 2**64}, np.zeros(10, dtype=np.int16), "integer_out_of_range"),
    ({}, np.zeros(0, dtype=np.int16), "empty_payload"),
    ({}, np.zeros(wire.DEFAULT_MAX_CHUNK_BYTES // 2 + 1, dtype=np.int16), "oversize_payload"),
])
def test_encode_refuses_invalid_chunks(kw, pcm, reason):
    with pytest.raises(WireFormatError) as info:
        encode_chunk(make_header(**kw), pcm)
    assert info.value.reason == reason


def test_float_to_pcm16_refuses_nan_and_inf():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros(100)
        x[37] = bad
        with pytest.raises(WireFormatError) as info:
            float_to_pcm16(x)
        assert info.value.reason == "non_finite_samples"


# ---------------------------------------------------------------- bad records

def _score_dict(**kw):
    d = dict(device_id="d", machine_type="fan", window_id="d:0-9", first_seq=0, last_seq=9, window_start_ns=0,
             window_end_ns=1, score=0.5, scores={"a": 0.5}, threshold=1.0, is_anomaly=False, model_version="v1",
             scored_at_ns=2, capture_to_score_s=0.1, flags=[], schema="asd.score/1")
    d.update(kw)
    return d


@pytest.mark.parametrize("data,reason", [
    (b"{not json", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[1, 2]", "bad_record"),
    (json.dumps(_score_dict(schema="asd.score/2")), "unknown_schema_version"),
    (json.dumps({k: v for k, v in _score_dict().items() if k != "schema"}), "unknown_schema_version"),
    (json.dumps(_score_dict(extra_field=1)), "bad_record"),
    (json.dumps({k: v for k, v in _score_dict().items() if k != "threshold"}), "bad_record"),
    (json.dumps(_score_dict(score="high")), "bad_record"),
    (json.dumps(_score_dict()).replace('"score": 0.5', '"score": NaN'), "non_finite_samples"),
    (json.dumps(_score_dict()).replace('"threshold": 1.0', '"threshold": Infinity'), "non_finite_samples"),
])
def test_bad_score_records(data, reason):
    with pytest.raises(WireFormatError) as info:
        ScoreRecord.from_json(data)
    assert info.value.reason == reason


def test_score_record_from_alert_schema_is_refused():
    alert = AlertRecord(alert_id="a", device_id="d", machine_type="fan", state="raised", window_id="w", score=1.0,
                        threshold=0.5, windows_over=3, windows_seen=5, model_version="v", at_ns=1)
    with pytest.raises(WireFormatError) as info:
        ScoreRecord.from_json(alert.to_json())
    assert info.value.reason == "unknown_schema_version"
    bad_state = json.loads(alert.to_json())
    bad_state["state"] = "maybe"
    with pytest.raises(WireFormatError) as info:
        AlertRecord.from_json(json.dumps(bad_state))
    assert info.value.reason == "bad_record"


def test_non_finite_score_cannot_be_published():
    rec = ScoreRecord(**{k: v for k, v in _score_dict(score=math.nan).items()})
    with pytest.raises(WireFormatError) as info:
        rec.to_json()
    assert info.value.reason == "non_finite_samples" and "score" in str(info.value)


def test_dlq_headers_keep_originals_and_add_reason(msg):
    key, value, headers = msg
    err = WireFormatError("truncated_payload", "odd bytes")
    out = dict(dlq_headers(headers, err, topic="asd.audio", partition=3, offset=42))
    assert out["ce_seq"] == b"7"
    assert out["asd_dlq_reason"] == b"truncated_payload" and out["asd_dlq_detail"] == b"odd bytes"
    assert (out["asd_dlq_topic"], out["asd_dlq_partition"], out["asd_dlq_offset"]) == (b"asd.audio", b"3", b"42")
