"""`tuneforge verify --against serve:URL` against a real `tuneforge serve` subprocess: the server applying the run's
adapter reproduces the reference's greedy answers token for token; one serving the bare base is reported as
diverging."""

from __future__ import annotations

from tuneforge.artifacts.verify import verify


def test_verify_against_a_served_adapter(tiny_model_dir, adapter_dirs, serve_process, tmp_path):
    run = adapter_dirs["lora-a"]
    with serve_process(tiny_model_dir, "--base-name", "base", "--adapter", f"a={run}") as server:
        same = verify(run, f"serve:{server.base}", served_model="a", n_prompts=6, max_new_tokens=12,
                      output=tmp_path / "a.json")
        bare = verify(run, f"serve:{server.base}/v1", served_model="base", n_prompts=6, max_new_tokens=12,
                      write=False)
    assert same["runtime"] == "HTTP /v1/completions" and same["mean_kl"] is None
    assert same["passed"] and same["agreement"] == 1.0, same["per_prompt"]
    assert same["first_divergence"] is None and (tmp_path / "a.json").is_file()
    assert not bare["passed"] and bare["agreement"] < 0.5, bare["per_prompt"]
    assert bare["first_divergence"] is not None and bare["diverged_prompts"]
