"""Cell 7 of chapter 07 alone: st_labels + build_stores timings; a fresh run folder."""
import sys, time, os, shutil, json
from pathlib import Path
from stlib import realtissue as rt
from stlib.io import cohort
def main():
    D = "/tmp/i10l/work/data/realtissue"
    R = sys.argv[1]
    workers = None if len(sys.argv) < 3 else int(sys.argv[2])
    shutil.rmtree(R, ignore_errors=True)
    table = cohort.cohort_table(D)
    train_ids = table.loc[table.role == "train", "sample"].tolist()
    test_ids = table.loc[table.role == "held-out", "sample"].tolist()
    consep = rt.natural_sorted([s for s in test_ids if s.startswith("CONSEP")])[:4]
    global cpu
    def cpu():
        import resource
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + r.ru_utime + r.ru_stime
    out = {"loadavg_before": os.getloadavg()}
    t0, c0 = time.perf_counter(), cpu()
    kw = {} if workers is None else {"workers": workers}
    tab = rt.st_labels(D, R, train_ids + consep, classes_for=consep, seed=0, **kw)
    out["st_labels"] = (time.perf_counter() - t0, cpu() - c0)
    t0, c0 = time.perf_counter(), cpu()
    stores = rt.build_stores(D, R, table[table.role == "train"], um_per_px=0.25, tile_px=256, seed=0, refine_masks=True)
    out["build_stores"] = (time.perf_counter() - t0, cpu() - c0)
    out["loadavg_after"] = os.getloadavg()
    out["table"] = tab.drop(columns=["seconds"]).to_dict("records")
    print(json.dumps(out, default=str))

if __name__ == '__main__':
    main()
