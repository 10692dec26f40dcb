"""bench/decode_profile.py's trace summary on a small synthetic Perfetto trace."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import decode_profile  # noqa: E402


def test_summary_counts_kernels_busy_time_and_gaps(tmp_path):
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
  kernels = [("gemm_fusion_1", 0, 10), ("loop_fusion_2", 15, 5), ("gemm_fusion_1", 18, 4),
             ("gemm_fusion_1", 40, 10), ("loop_fusion_2", 60, 5)]  # two steps, 65 us traced
  events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": t, "dur": d}
                   for n, t, d in kernels]
  events += [{"ph": "X", "pid": 1, "tid": 9, "name": "fusion", "ts": 0, "dur": 65},
             {"ph": "X", "pid": 2, "tid": 1, "name": "host", "ts": 0, "dur": 100}]
  path = tmp_path / "perfetto_trace.json"
  path.write_text(json.dumps({"traceEvents": events}))
  spans = decode_profile.device_events(str(path))[0]
  assert len(spans) == 5  # the stream only: not the XLA Ops line, not the host
  assert decode_profile.busy_time(spans) == 10 + 7 + 10 + 5  # 18..22 overlaps 15..20
  text = decode_profile.summarise(spans, steps=2, top=5)
  assert "per step: 2 kernels, device busy 0.016 ms of 0.033 ms traced (49% busy" in text
  assert "| gemm_fusion_1 | matmul | 1.5 | 8.0 | 0.012 |" in text
