import re
from pathlib import Path

import pytest

from cosmos_train.errors import SpecError
from cosmos_train.spec import ExperimentSpec
from cosmos_train.spec_loading import apply_overrides, json_schema, load_spec, load_spec_text

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.toml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_follow_upstream_values():
    s = ExperimentSpec()
    assert (s.optimizer.lr, s.optimizer.weight_decay, s.optimizer.betas, s.optimizer.eps) == (1e-4, 0.1, (0.9, 0.99), 1e-8)
    assert (s.scheduler.warm_up_steps, s.scheduler.f_start, s.scheduler.f_max, s.scheduler.f_min) == ([1000], [1e-6], [1.0], [1.0])
    assert (s.model.lora.rank, s.model.lora.alpha) == (16, 16)
    assert s.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]
    assert s.model.ema.s == 0.1 and s.data.text_dropout == 0.2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates_and_round_trips_through_toml(path):
    spec = load_spec(path)
    assert load_spec_text(spec.to_toml()) == spec


def test_lora_example_values():
    s = load_spec(Path(__file__).parents[1] / "examples" / "14b_lora.toml")
    assert (s.model.lora.rank, s.parallel.cp, s.checkpoint.save_iter, s.trainer.max_iter) == (32, 4, 300, 1500)
    assert s.optimizer.lr == 2 ** -11 and s.scheduler.f_max == [0.6] and s.scheduler.f_min == [0.0]


def test_wrong_value_names_file_dotted_path_and_value(tmp_path):
    f = write(tmp_path / "s.toml", "[optimizer]\nlr = -1\n")
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert str(e.value) == f"{f}: optimizer.lr: Input should be greater than 0 (got -1)"


def test_unknown_key_suggests_the_closest_one(tmp_path):
    f = write(tmp_path / "s.toml", "[trainer]\nmax_itr = 5\n[data]\ndatasets = [{dataset_dir='a', wieght=2}]\n")
    with pytest.raises(SpecError) as e:
        load_spec(f)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert "trainer.max_itr: unknown key; did you mean 'max_iter'?" in lines[0] + lines[1]
    assert "data.datasets[0].wieght: unknown key; did you mean 'weight'?" in lines[0] + lines[1]


def test_toml_syntax_error_names_the_line(tmp_path):
    f = write(tmp_path / "s.toml", "[job]\nname = \n")
    with pytest.raises(SpecError, match=r"line 2"):
        load_spec(f)


@pytest.mark.parametrize("text, fragment", [
    ("[scheduler]\nf_max = [1.0, 0.5]\n", "must have equal lengths"),
    ("[data]\nnum_frames = 20\n", "data.num_frames: must be 4k+1"),
    ("[parallel]\ncp = 5\n", "parallel.cp: must divide the latent frame count 24"),
    ("[parallel]\ncp = 3\ncp_mode = 'a2a'\n[data]\nnum_frames = 9\n", "needs num_heads (4) divisible by cp"),
    ("[model.lora]\nrank = 4\n", "train_architecture is 'full'"),
    ("[model]\ntrain_architecture = 'lora'\n[model.lora]\ntarget_modules = ''\n", "needs at least one module name"),
    ("[data]\nkind = 'video_folder'\n", "needs data.dataset_dir"),
    ("[parallel]\ndp_shard = 0\n", "parallel.dp_shard"),
    ("[model]\nnum_condition_frames = 24\n", "model.num_condition_frames: must be below the latent frame count 24"),
    ("[parallel]\ncp = 4\ncp_mode = 'hybrid'\ncp_a2a_degree = 3\n", "parallel.cp_a2a_degree: must divide parallel.cp (4) (got 3)"),
    ("[parallel]\ncp = 8\ncp_mode = 'hybrid'\ncp_a2a_degree = 8\n",
     "parallel.cp_a2a_degree: cp_mode 'hybrid' needs num_heads (4) divisible by cp_a2a_degree (got 8)"),
    ("[parallel]\ncp_a2a_degree = 0\n", "parallel.cp_a2a_degree"),
    ("[parallel]\ncp_mode = 'zigzag'\n", "'ring', 'a2a' or 'hybrid'"),
])
def test_cross_field_checks(tmp_path, text, fragment):
    with pytest.raises(SpecError, match=None) as e:
        load_spec(write(tmp_path / "s.toml", text))
    assert fragment in str(e.value)


def test_target_modules_accept_comma_string_and_list():
    a = load_spec_text("[model]\ntrain_architecture='lora'\n[model.lora]\ntarget_modules='q_proj, mlp.layer1'\n")
    b = load_spec_text("[model]\ntrain_architecture='lora'\n[model.lora]\ntarget_modules=['q_proj','mlp.layer1']\n")
    assert a.model.lora.target_modules == b.model.lora.target_modules == ["q_proj", "mlp.layer1"]


def test_base_files_merge_recursively_and_cycles_are_caught(tmp_path):
    write(tmp_path / "root.toml", "[optimizer]\nlr = 0.5\nweight_decay = 0.0\n[job]\nname = 'root'\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.toml", "base = '../root.toml'\n[optimizer]\nlr = 0.25\n")
    top = write(tmp_path / "top.toml", "base = 'sub/mid.toml'\n[job]\nname = 'top'\n")
    s = load_spec(top)
    assert (s.optimizer.lr, s.optimizer.weight_decay, s.job.name) == (0.25, 0.0, "top")
    write(tmp_path / "a.toml", "base = 'b.toml'\n")
    write(tmp_path / "b.toml", "base = 'a.toml'\n")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(tmp_path / "a.toml")


def test_overrides_parse_toml_values_and_fall_back_to_strings(tmp_path):
    f = write(tmp_path / "s.toml", "[job]\nname = 'x'\n")
    s = load_spec(f, ["optimizer.lr=3.05e-5", "parallel.cp=1", "job.wandb_mode=offline",
                      'model.train_architecture=lora', 'model.lora.target_modules=["q_proj","k_proj"]'])
    assert s.optimizer.lr == 3.05e-5 and s.job.wandb_mode == "offline"
    assert s.model.lora.target_modules == ["q_proj", "k_proj"]
    with pytest.raises(SpecError, match="expected key.path=value"):
        apply_overrides({}, ["optimizer.lr"])
    with pytest.raises(SpecError, match="parallel.cp: Input should be a valid integer"):
        load_spec(f, ["parallel.cp=two"])


def test_run_dir_precedence(tmp_path):
    s = load_spec_text("[job]\nproject='p'\ngroup='g'\nname='n'\n")
    assert s.run_dir(env={}) == Path("outputs/p/g/n")
    assert s.run_dir(env={"COSMOS_TRAIN_OUTPUT_ROOT": "/r"}) == Path("/r/p/g/n")
    s.job.output_root = str(tmp_path)
    assert s.run_dir(env={"COSMOS_TRAIN_OUTPUT_ROOT": "/r"}) == tmp_path / "p/g/n"


def test_json_schema_describes_every_field():
    schema = json_schema()
    assert set(schema["properties"]) == {"job", "model", "data", "optimizer", "scheduler", "trainer", "parallel", "checkpoint"}
    for name, model in schema["$defs"].items():
        for field, prop in model.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{field} has no description"


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lr=inf", "optimizer.lr: Input should be a finite number"),
    ("optimizer.eps=inf", "optimizer.eps: Input should be a finite number"),
    ("trainer.loss_scale=inf", "trainer.loss_scale: Input should be a finite number"),
    ("trainer.loss_scale=nan", "trainer.loss_scale: Input should be a finite number"),
    ("scheduler.f_start=[-1.0]", "scheduler.f_start: multipliers must be >= 0"),
    ("scheduler.f_min=[-0.5]", "scheduler.f_min: multipliers must be >= 0"),
    ("trainer.validation_sigmas=[-1.0]", "trainer.validation_sigmas: noise levels must be > 0"),
    ("trainer.validation_sigmas=[inf]", "trainer.validation_sigmas[0]: Input should be a finite number"),
    ("data.video_size=[100000,100000]", "data.video_size: both sizes must be in 1..16384"),
    ('job.name="../../../../escaped"', "job.name: must be a single directory name"),
    ('job.name="/abs/path"', "job.name: must be a single directory name"),
    ('job.name=""', "job.name: must be a single directory name"),
    ('job.group=".."', "job.group: must be a single directory name"),
    ('job.project="a/b"', "job.project: must be a single directory name"),
])
def test_values_that_cannot_train_or_escape_are_refused(tmp_path, override, fragment):
    f = write(tmp_path / "s.toml", "")
    with pytest.raises(SpecError, match=re.escape(fragment)):
        load_spec(f, [override])


def test_unreadable_spec_files_are_one_line_errors(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b"[job]\nname = \"caf\xe9\"\n")
    write(tmp_path / "child.toml", 'base = "dir.toml"\n')
    for name, fragment in (("dir.toml", "is a directory"), ("latin1.toml", "not a UTF-8 text file"),
                           ("child.toml", "dir.toml: is a directory")):
        with pytest.raises(SpecError, match=re.escape(fragment)):
            load_spec(tmp_path / name)


def test_output_root_that_is_a_file_is_a_clear_error(tmp_path):
    from cosmos_train.run_dir import prepare_run_dir

    (tmp_path / "afile").write_text("")
    spec = load_spec(write(tmp_path / "s.toml", f'[job]\noutput_root = "{tmp_path / "afile"}"\n'))
    with pytest.raises(SpecError, match=r"afile: is a file, so the run directory .* cannot be created"):
        prepare_run_dir(spec)
