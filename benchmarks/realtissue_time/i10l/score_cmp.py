"""Chapter 07's held-out scoring and classification, serial (workers=1, this process) vs parallel
(workers=2), on the real-tissue cohort: identical rows / maps? CPU (self + children) and wall."""
import json, os, resource, sys, time
import numpy as np, pandas as pd, torch


def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + r.ru_utime + r.ru_stime


def main():
    from stlib import realtissue as rt
    from stlib.infer import load_inference_model
    from stlib.io import cohort
    from stlib.model.net import HoVerNet
    D, R = "/tmp/i10l/work/data/realtissue", "/tmp/i10l/work/runs/realtissue"
    RL = sys.argv[1]  # run folder with the labels of cell 7 (classes of 4 CoNSeP images)
    order = sys.argv[2].split(",") if len(sys.argv) > 2 else ["1", "2"]
    table = cohort.cohort_table(D)
    test_ids = table.loc[table.role == "held-out", "sample"].tolist()
    tests = rt.load_test_images(D, test_ids)
    torch.manual_seed(0)
    recipe = rt.RecipeConfig()
    methods = {"ST-trained": R + "/models/st/model.pt", "manual-trained": R + "/models/manual/model.pt",
               "classical (Otsu + watershed)": "classical", "untrained": HoVerNet(encoder="small")}
    consep = rt.natural_sorted([s for s in test_ids if s.startswith("CONSEP")])
    cls_tr, cls_te = consep[:4], consep[4:]
    by_name = {a.name: a for a in tests}
    out = {"torch_threads_here": torch.get_num_threads(), "loadavg_before": os.getloadavg(), "runs": {}}
    res = {}
    for w in order:
        w = int(w)
        t0, c0 = time.perf_counter(), cpu()
        per, preds = rt.score_images(methods, tests, device="cpu", model_um_per_px=0.25, keep_predictions=True,
                                     postproc=rt.postproc_of(recipe), workers=w)
        t1, c1 = time.perf_counter(), cpu()
        tr, te, sets = rt.classification_sets(RL, D, by_name, cls_tr, cls_te, 0.25)
        st_model = load_inference_model(methods["ST-trained"], device="cpu").model
        cls, conf = rt.classification_experiment(st_model, tr, te, sets, device="cpu", seed=0, workers=w)
        t2, c2 = time.perf_counter(), cpu()
        out["runs"][w] = {"scoring_wall_s": t1 - t0, "scoring_cpu_s": c1 - c0, "classification_wall_s": t2 - t1,
                          "classification_cpu_s": c2 - c1, "loadavg_after": os.getloadavg(),
                          "max_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                          "max_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        res[w] = (per, preds, cls, conf)
        print(json.dumps(out["runs"][w]), flush=True)
    (p1, q1, k1, f1), (p2, q2, k2, f2) = res[1], res[2]
    pd.testing.assert_frame_equal(p1, p2, check_exact=True)
    n_maps = 0
    for name in q1:
        for a, b in zip(q1[name], q2[name]):
            assert np.array_equal(a, b), name
            n_maps += 1
    pd.testing.assert_frame_equal(k1, k2, check_exact=True)
    pd.testing.assert_frame_equal(f1, f2, check_exact=True)
    out["identical"] = {"per_image_rows": len(p1), "instance_maps": n_maps, "classification_rows": len(k1),
                        "confusion_equal": True}
    out["bpq_mean"] = p1.groupby("model")["bpq"].mean().to_dict()
    out["cls_mean"] = k1.groupby("labels")[["accuracy", "macro_f1"]].mean().to_dict()
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
