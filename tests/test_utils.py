

def test_keep_freed_memory_applies_each_setting_and_repeats_nothing(monkeypatch):
    """The shared malloc setting calls ``mallopt`` once per changed parameter; a repeated call
    with the same values does nothing, a stage with other values applies only those."""
    import ctypes

    from stlib import utils

    calls = []

    class _Lib:
        @property
        def mallopt(self):
            def f(k, v):
                calls.append((k, v))
                return 1  # accepted (the process's real settings stay untouched)
            f.argtypes = None
            return f

    monkeypatch.setattr(ctypes, "CDLL", lambda *_a, **_k: _Lib())
    monkeypatch.setattr(utils, "_malloc_settings", {})
    assert utils.keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=64 << 20)
    assert sorted(calls) == sorted([(-3, 32 << 20), (-1, 64 << 20)])
    calls.clear()
    assert utils.keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=64 << 20)
    assert calls == []
    assert utils.keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=128 << 20, top_pad=1 << 20)
    assert sorted(calls) == sorted([(-1, 128 << 20), (-2, 1 << 20)])
