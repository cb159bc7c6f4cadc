"""The command line's contract, over every command: bad input ends with exit status 2 and one
line `deeproots CMD: error: ...` on stderr, never a traceback, and no file of an existing
run changes. A new command or option joins the table below."""
import hashlib
import os

import pytest

from deeproots.cli import main
from helpers import run_cli, write_fashion_mnist


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run, its data, and the odd paths the bad inputs point at."""
    root = tmp_path_factory.mktemp("contract")
    data = root / "data"
    write_fashion_mnist(data, n_train=32, n_test=16, size=8)
    run = root / "run"
    assert main(["train", "nin-root-4", "--data-dir", str(data), "--epochs", "1",
                 "--batch-size", "16", "--out", str(run), "--device", "cpu", "--no-download",
                 "--no-progress"]) == 0
    (root / "empty.pt").write_bytes(b"")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 not really")
    (root / "file").write_text("a file, not a folder")
    (root / "summary.json").write_text("{not json")
    (root / "folder").mkdir()
    (root / "fresh").mkdir()  # an empty folder: where a command may write a new file
    (root / "mine.py").write_text(MINE)
    (root / "exits.py").write_text("import sys\nsys.exit(7)\n")
    (root / "existing.onnx").write_bytes(b"a user's file")
    for name, records in (("list_records", "[1, 2]\n"), ("bare_records", '{"kind": "step"}\n'),
                          ("no_records", "")):
        (root / name).mkdir()
        (root / name / "summary.json").write_bytes((run / "summary.json").read_bytes())
        (root / name / "metrics.jsonl").write_text(records)
    (root / "list_summary").mkdir()
    (root / "list_summary" / "summary.json").write_text("[1]")
    (root / "list_summary" / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes())
    (root / "tb_file").mkdir()
    (root / "tb_file" / "tensorboard").write_text("a file where the event files would go")
    for name, manifest in (("empty_study", "{}"), ("list_study", "[1, 2]"),
                           ("other_study", '{"name": "another tool", "version": 3}')):
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(manifest)
    return {"root": root, "data": str(data), "run": str(run), "ckpt": str(run / "last.pt"),
            "exits": str(root / "exits.py"), "existing": str(root / "existing.onnx"),
            "empty_study": str(root / "empty_study"), "list_study": str(root / "list_study"),
            "other_study": str(root / "other_study"),
            "empty": str(root / "empty.pt"), "corrupt": str(root / "corrupt.pt"),
            "file": str(root / "file"), "under_file": str(root / "file" / "x"),
            "folder": str(root / "folder"), "missing": str(root / "missing"),
            "fresh": str(root / "fresh"), "tb_file": str(root / "tb_file"),
            **{k: str(root / k / "summary.json") for k in ("list_records", "bare_records",
                                                          "no_records", "list_summary")},
            "bad_summary": str(root / "summary.json"), "mine": str(root / "mine.py")}


MINE = """import torch


def small():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))


def not_a_model():
    return 3


class _Dict(torch.nn.Module):
    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, num_classes, 3)

    def forward(self, x):
        return {"logits": self.conv(x).mean((2, 3))}


class _Two(_Dict):
    def forward(self, x, mask):
        return self.conv(x * mask).mean((2, 3))


class _Exits(torch.nn.Module):
    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, num_classes, 3)

    def forward(self, x):
        import sys
        sys.exit(7)


def exits_in_forward(in_channels=3, num_classes=10):
    return _Exits(in_channels, num_classes)


def depthwise_only():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 16, 3, groups=16),
                               torch.nn.Conv2d(16, 32, 1))


def returns_dict(in_channels=3, num_classes=10):
    return _Dict(in_channels, num_classes)


def takes_two(in_channels=3, num_classes=10):
    return _Two(in_channels, num_classes)
"""


def _snapshot(folder):
    return {p: hashlib.md5(open(os.path.join(folder, p), "rb").read()).hexdigest()
            for p in sorted(os.listdir(folder))}


# (command, argv after the command with {placeholders}, a phrase the error must contain)
CASES = [
    ("list", ["zzz*"], "no model matches 'zzz*'"),
    ("profile", ["nin-rot-8"], "unknown model 'nin-rot-8'"),
    ("profile", ["nin", "--batch", "3"], "unrecognized arguments: --batch 3"),
    ("rootify", ["nin", "--schedule", "root-8", "--latncy", "0.7"],
     "unrecognized arguments: --latncy 0.7"),
    ("profile", ["nin", "--groups", "conv2a=5"], "5 groups do not divide"),
    ("profile", ["nin", "--groups", "conv2a"], "LAYER=GROUPS"),
    ("profile", ["nin", "--groups", "conv9=2"], "matches no conv layer"),
    ("profile", ["nin", "--input-size", "2"], "at least 4"),
    ("profile", ["nin", "--input-size", "abc"], "--input-size takes S, H,W or C,H,W"),
    ("profile", ["nin", "--input-size", "0"], "whole numbers >= 1; got '0'"),
    ("profile", ["nin", "--num-classes", "-1"], "--num-classes must be a whole number >= 0; got -1"),
    ("profile", ["nin", "--num-classes", "nan"], "--num-classes takes a whole number; got 'nan'"),
    ("profile", ["nin", "--in-channels", "-1"], "--in-channels must be a whole number >= 1"),
    ("table", ["table9"], "invalid choice: 'table9'"),
    ("train", ["nin-rot-8", "--out", "{missing}/a"], "unknown model 'nin-rot-8'"),
    ("train", ["nin", "--epochs", "0", "--out", "{missing}/a"], "epochs must be a whole number >= 1"),
    ("train", ["nin", "--epochs", "1e9x"], "expected a whole number; got '1e9x'"),
    ("train", ["nin", "--compile", "fastest"], "invalid choice: 'fastest'"),
    ("train", ["nin", "--grouped-conv", "cudnn"], "invalid choice: 'cudnn'"),
    ("train", ["nin", "--grouped-conv", "dispatch", "--device", "cpu", "--out", "{run}",
               "--overwrite"], "grouped_conv 'dispatch' runs on CUDA GPUs; got device cpu"),
    ("train", ["nin", "--lr", "nan", "--out", "{missing}/a"], "lr must be a finite number > 0; got nan"),
    ("train", ["nin", "--lr", "inf", "--out", "{missing}/a"], "lr must be a finite number > 0; got inf"),
    ("train", ["nin", "--lr", "-0.1", "--out", "{missing}/a"], "lr must be a finite number > 0"),
    ("train", ["nin", "--batch-size", "0", "--out", "{missing}/a"], "batch_size must be a whole"),
    ("train", ["nin", "--warmup-epochs", "nan", "--out", "{missing}/a"], "warmup_epochs must be a finite"),
    ("train", ["nin", "--seed", str(2**64), "--out", "{missing}/a"], "seed must be a whole number from 0"),
    ("train", ["nin", "--momentum", "1.5", "--out", "{missing}/a"], "momentum must be from 0 to below 1"),
    ("train", ["nin", "--workers", "-1", "--out", "{missing}/a"], "workers must be a whole number >= 0"),
    ("train", ["nin", "--schedule", "linear"], "invalid choice: 'linear'"),
    ("train", ["nin", "--device", "tpu", "--out", "{missing}/a"], "device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
    ("train", ["nin", "--data", "mnist", "--out", "{missing}/a"], "unknown data 'mnist'"),
    ("train", ["nin", "--data-dir", "{missing}", "--out", "{missing}/a"], "does not exist"),
    ("train", ["nin", "--data-dir", "{data}", "--out", "{file}"], "is a file; give a folder"),
    ("train", ["nin", "--data-dir", "{data}", "--out", "{under_file}"], "lies under the file"),
    ("train", ["nin-root-4", "--data-dir", "{data}", "--out", "{run}"], "already holds a run"),
    ("train", ["--resume", "--out", "{folder}"], "--resume: no checkpoint at"),
    ("train", ["--resume", "--out", "{run}", "--lr", "1"], "this run was started with lr = 0.1"),
    ("train", ["--resume", "--out", "{run}", "--change", "device"], "change takes settings of the run"),
    ("train", ["--resume", "--out", "{run}", "--opt", "adamw", "--change", "opt"],
     "resume: this run was started with opt = 'sgd', and its checkpoint holds that "
     "optimizer's state; it cannot go on by 'adamw'. Fine-tune its weights instead"),
    ("train", ["--resume", "--out", "{run}", "--overwrite"], "give one of them"),
    ("train", ["--data-dir", "{data}"], "name a model to train"),
    ("train", ["nin", "--limit-train-batches", "0", "--out", "{missing}/a"], "limit_train_batches must be"),
    ("train", ["resnet50", "--batch-size", "1", "--data-dir", "{data}", "--out", "{missing}/a",
               "--device", "cpu"], "batch norm needs at least 2 images"),
    ("eval", ["{missing}/last.pt"], "does not exist"),
    ("eval", ["{empty}"], "is empty (0 bytes)"),
    ("eval", ["{corrupt}"], "is corrupt"),
    ("eval", ["{folder}"], "is a folder, not a checkpoint file"),
    ("eval", ["{ckpt}", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    ("profile", ["nin", "--out-indices", "1"],
     "--out-indices picks the feature maps of a backbone: add --features-only"),
    ("profile", ["{mine}:small", "--features-only"],
     "--features-only makes a deeproots model a backbone;"),
    ("export", ["nin", "--features-only", "--out-indices", "3", "--format", "onnx", "--out",
                "{fresh}/b.onnx"], "feature map indices must be stage numbers 0 to 2"),
    ("profile", ["{ckpt}", "--groups", "conv2a=2"],
     "--groups cannot change a trained checkpoint's model; profile CHECKPOINT takes the model"),
    ("bench", ["{missing}/bst.pt"], "checkpoint {missing}/bst.pt: no such file (bench takes"),
    # a trained model's channels are its data's: --input-size C,H,W cannot change them (it was
    # "Build it with in_channels=3", advice a trained model cannot take)
    ("profile", ["{ckpt}", "--input-size", "3,8,8"],
     "--input-size 3,8,8: {ckpt} was trained on 1-channel images (fashion-mnist); give 1,H,W"),
    ("export", ["{ckpt}", "--format", "pt2", "--out", "{fresh}/c.pt2", "--input-size", "3,8,8"],
     "--input-size 3,8,8: {ckpt} was trained on 1-channel images (fashion-mnist); give 1,H,W"),
    ("bench", ["{ckpt}", "--input-size", "3,8,8"], "{ckpt} was trained on 1-channel images"),
    # a named dataset of other images: refused before its files are looked for or downloaded
    ("eval", ["{ckpt}", "--data", "cifar10", "--data-dir", "{folder}"],
     "takes 1-channel images and cifar10 has 3-channel ones: evaluate it on images like"),
    ("analyze", ["{ckpt}", "--data", "cifar10", "--out", "{fresh}/a"],
     "takes 1-channel images and cifar10 has 3-channel ones"),
    ("rootify", ["{ckpt}", "--data", "cifar10", "--schedule", "root-8", "--out", "{fresh}/c.pt"],
     "takes 1-channel images and cifar10 has 3-channel ones: calibrate it on images like"),
    ("eval", ["{ckpt}", "--data", "mnist", "--device", "cpu"], "unknown data 'mnist'"),
    ("eval", ["{ckpt}", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    ("eval", ["{ckpt}", "--mean", "0.5", "--std", "0.25", "--device", "cpu"],
     "--mean and --std set how an image folder's images are normalised; fashion-mnist's"),
    ("eval", ["{ckpt}", "--mean", "x"], "argument --mean: expected a number; got 'x'"),
    ("train", ["nin", "--in-channels", "1", "--out", "{missing}/a"],
     "--in-channels sets how an image folder's images are read; fashion-mnist's"),
    ("eval", ["{ckpt}", "--data-dir", "{missing}", "--device", "cpu"], "does not exist"),
    ("analyze", ["{ckpt}", "--out", "{file}"], "is a file; give a folder"),
    ("analyze", ["{ckpt}", "--out", "{missing}/an", "--eps", "nan", "--device", "cpu"],
     "eps must be a finite number >= 0; got nan"),
    ("analyze", ["{ckpt}", "--out", "{missing}/an", "--blocks", "0"], "--blocks must be a whole"),
    ("analyze", ["{corrupt}", "--out", "{missing}/an"], "is corrupt"),
    ("plot-costs", ["nin", "nin-rot-8", "--out", "{fresh}/c.png"], "unknown model 'nin-rot-8'"),
    ("plot-costs", ["nin", "nin-root-8", "--out", "{folder}"], "is a folder; give a file name"),
    ("plot-costs", ["nin", "nin-root-8", "--out", "{under_file}"], "lies under the file"),
    ("plot-costs", ["nin", "nin-root-8", "--input-size", "2", "--out", "{fresh}/c.png"], "at least 4"),
    ("plot-costs", ["nin", "nin-root-8", "--out", "{fresh}/c.txt"],
     "--out {fresh}/c.txt: a figure is written as .png, .svg, .pdf, by the file's suffix; got .txt"),
    ("plot-results", ["{run}/summary.json", "--out", "{fresh}/r"], "got no suffix"),
    ("plot-results", ["{missing}/summary.json", "--out", "{fresh}/r.png"], "is not a deeproots summary.json"),
    ("plot-results", ["{bad_summary}", "--out", "{fresh}/r.png"], "is not a deeproots summary.json"),
    ("plot-results", ["{run}/summary.json", "--out", "{folder}"], "is a folder; give a file name"),
    ("bench", ["nin-rot-8"], "unknown model 'nin-rot-8'"),
    ("bench", [], "name at least one model to time"),
    ("bench", ["nin", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    ("bench", ["nin", "--threads", "0"], "--threads must be a whole number >= 1"),
    ("bench", ["nin", "--repeats", "0"], "--repeats must be a whole number >= 1"),
    ("bench", ["nin", "--warmup", "-1"], "--warmup must be a whole number >= 0"),
    ("bench", ["nin", "--device", "tpu"], "device must be cpu, cuda or cuda:N; got 'tpu'"),
    ("bench", ["nin", "--path", "tvm"], "invalid choice: 'tvm'"),
    ("bench", ["nin", "--dtype", "float16"], "invalid choice: 'float16'"),
    ("bench", ["nin", "--allocator", "tcmalloc"],
     "invalid choice: 'tcmalloc' (choose from 'auto', 'jemalloc', 'glibc', 'system')"),
    ("bench", ["--paper", "resnet200"], "invalid choice: 'resnet200'"),
    ("bench", ["nin", "--input-size", "2", "--batch-size", "2"], "at least 4"),
    ("bench", ["nin", "--layers", "--plot", "{folder}"], "is a folder; give a file name"),
    ("bench", ["nin", "--layers", "--path", "script"], "--layers times paths eager, fold, openvino"),
    ("bench", ["nin", "--compile", "fast", "--mode", "train"], "invalid choice: 'fast'"),
    ("bench", ["nin", "--compile"], "set the training step: add --mode train"),
    ("bench", ["nin", "--detail"], "set the training step: add --mode train"),
    ("bench", ["nin", "--memory-format", "contiguous"], "set the training step: add --mode train"),
    ("bench", ["nin", "--mode", "train", "--memory-format", "nhwc"], "invalid choice: 'nhwc'"),
    ("train", ["nin", "--memory-format", "nhwc"], "invalid choice: 'nhwc'"),
    ("train", ["nin", "--opt", "adam"], "invalid choice: 'adam' (choose from 'sgd', 'adamw')"),
    ("train", ["nin", "--opt", "adamw", "--momentum", "0.95", "--out", "{missing}/a"],
     "momentum = 0.95 sets SGD's momentum, but opt is 'adamw'; give --opt sgd too, or leave "
     "momentum out"),
    ("train", ["nin", "--log-every", "0", "--out", "{missing}/a"],
     "log_every must be a whole number >= 1; got 0"),
    ("plot-results", ["{bad_summary}", "--curves", "--out", "{fresh}/c.png"],
     "cannot read the run's records"),
    ("bench", ["nin", "--mode", "train", "--dtype", "bfloat16"],
     "--mode train follows deeproots train's recipe"),
    ("bench", ["nin", "--mode", "train", "--grouped-conv", "dispatch"],
     "grouped_conv 'dispatch' runs on CUDA GPUs; got device cpu"),
    ("bench", ["nin", "--grouped-conv", "cudnn"], "invalid choice: 'cudnn'"),
    ("bench", ["nin", "--path", "cudagraph", "--batch-size", "2"],
     "path 'cudagraph' runs on CUDA GPUs; got an input on cpu"),
    ("study", ["vgg"], "unknown model family 'vgg'"),
    ("study", ["nin", "--seeds", "0"], "--seeds must be a whole number >= 1"),
    ("study", ["nin", "--variants", "root-3", "--out", "{missing}/s"], "unknown variant 'root-3'"),
    ("study", ["nin", "--epochs", "0", "--out", "{missing}/s"], "epochs must be a whole number >= 1"),
    ("study", ["--report", "{folder}"], "holds no study"),
    ("study", [], "name a model family to study"),
    ("study", ["nin", "--out", "{run}"], "is not empty and holds no study"),
    ("train", ["nin", "--out", "{list_study}"], "holds a study (manifest.json); its runs are "
                                                "the study's"),
    ("roofline", ["nin-rot-8"], "unknown model 'nin-rot-8'"),
    ("roofline", ["nin", "--device", "v100"], "invalid choice: 'v100'"),
    ("roofline", ["nin", "--peak-tflops", "0"], "peak_tflops must be a finite number from 0.001"),
    ("roofline", ["nin", "--bandwidth-tbs", "nan"], "bandwidth_tbs must be a finite number from"),
    ("roofline", ["nin", "--peak-tflops", "1e308"], "to 100000; got 1e+308"),
    ("roofline", ["nin", "--peak-tflops", "1e-320"], "peak_tflops must be a finite number from"),
    ("roofline", ["nin", "--bandwidth-tbs", "1e308"], "bandwidth_tbs must be a finite number"),
    ("roofline", ["nin", "--batch-size", "99999999999999999"],
     "batch_size must be a whole number from 1 to 16,777,216"),
    ("roofline", ["nin", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    ("roofline", ["nin", "--input-size", "2"], "at least 4"),
    ("rootify", ["nin-rot-8", "--schedule", "root-8"], "unknown model 'nin-rot-8'"),
    ("rootify", ["nin", "--schedule", "root8"], "schedule must be root-N, tree-N or col-N"),
    ("rootify", ["nin"], "one of the arguments --schedule --macs --params is required"),
    ("rootify", ["nin", "--macs", "0.01"], "no root-N schedule brings macs to 0.01"),
    ("rootify", ["nin", "--macs", "nan"], "macs must be a finite number > 0; got nan"),
    ("rootify", ["nin", "--schedule", "root-99999999999999"],
     "99999999999999 groups is more than the channels of any conv it groups (at most 192)"),
    ("rootify", ["{mine}:depthwise_only", "--macs", "0.5", "--input-size", "3,16,16"],
     "root-N changes nothing here"),
    ("rootify", ["{mine}:depthwise_only", "--macs", "0.5", "--input-size", "3,16,16",
                 "--ignore", "*"], "root-N changes nothing here"),
    ("rootify", ["nin", "--schedule", "root-8", "--stem", "deep"], "invalid choice: 'deep'"),
    ("rootify", ["nin", "--schedule", "root-8", "--ignore", "conv2"], "ignore 'conv2' matches no conv layer"),
    ("rootify", ["nin", "--schedule", "root-8", "--input-size", "2"], "could not run NiN"),
    ("rootify", ["{missing}/m.py:f", "--schedule", "root-2"], "no file"),
    ("rootify", ["{mine}:smal", "--schedule", "root-2", "--input-size", "3,8,8"], "has no function 'smal'; closest: small"),
    ("rootify", ["{mine}:not_a_model", "--schedule", "root-2"], "returned int, not an nn.Module"),
    ("rootify", ["{mine}:small", "--schedule", "root-2"], "has no default input size; give --input-size C,H,W"),
    ("export", ["nin-rot-8", "--format", "onnx", "--out", "{fresh}/m.onnx"], "unknown model"),
    ("export", ["nin", "--format", "tflite", "--out", "{fresh}/m"], "invalid choice: 'tflite'"),
    ("export", ["nin", "--format", "onnx", "--out", "{folder}"], "is a folder; give a file name"),
    ("export", ["nin", "--format", "onnx", "--out", "{fresh}/m.onnx", "--input-size", "2"],
     "at least 4"),
    ("export", ["nin", "--format", "onnx", "--out", "{fresh}/m.onnx", "--input-size", "1,32,32",
                "--in-channels", "3"],
     "--in-channels 3 and --input-size 1,32,32 disagree on the image channels"),
    ("export", ["nin", "--format", "onnx", "--out", "{fresh}/m.onnx", "--num-classes", "-1"],
     "--num-classes must be a whole number >= 0"),
    ("export", ["x", "--checkpoint", "{corrupt}", "--format", "onnx", "--out", "{fresh}/m"],
     "is corrupt"),
    ("export", ["x", "--checkpoint", "{ckpt}", "--format", "onnx", "--out", "{fresh}/m",
                "--groups", "conv2a=2"], "--groups cannot change a trained checkpoint's model"),
    ("export", ["{missing}/bst.pt", "--format", "pt2", "--out", "{fresh}/m.pt2"],
     "checkpoint {missing}/bst.pt: no such file (export takes a model name"),
    ("export", ["{ckpt}", "--format", "pt2", "--out", "{fresh}/m.pt2", "--groups", "conv2a=2"],
     "--groups cannot change a trained checkpoint's model"),
    ("export", ["nin", "--format", "onnx", "--out", "{fresh}/m", "--batch-size", "0"],
     "--batch-size must be a whole number >= 1"),
    # outputs: nothing is replaced without being asked, a run's own files never
    ("export", ["nin", "--format", "torchscript", "--out", "{ckpt}"],
     "last.pt is a file of the run in"),
    ("export", ["nin", "--format", "torchscript", "--out", "{ckpt}", "--overwrite"],
     "another command never replaces it"),
    ("export", ["nin", "--format", "onnx", "--out", "{existing}"],
     "existing.onnx already exists; add --overwrite to replace it"),
    ("plot-costs", ["nin", "nin-root-8", "--out", "{run}/summary.json"],
     "summary.json is a file of the run in"),
    ("plot-results", ["{run}/summary.json", "--out", "{run}/last.pt"],
     "last.pt is a file of the run in"),
    ("plot-results", ["{run}/summary.json", "--out", "{existing}"], "already exists"),
    ("bench", ["nin", "--layers", "--plot", "{run}/curves.png"], "curves.png is a file of the run"),
    # a study folder that is not a deeproots study
    ("study", ["--report", "{empty_study}"], "is not a deeproots study manifest (family, data"),
    ("study", ["--report", "{list_study}"], "is not a deeproots study manifest (a JSON list"),
    ("study", ["--report", "{other_study}"], "is not a deeproots study manifest"),
    ("study", ["nin", "--out", "{other_study}", "--data-dir", "{data}"],
     "is not a deeproots study manifest"),
    # models deeproots cannot feed one batch of images, or files that exit
    ("train", ["{mine}:returns_dict", "--data-dir", "{data}", "--out", "{missing}/a",
               "--device", "cpu", "--batch-size", "16"], "returns a dict for a batch of shape (1, 1, 8, 8)"),
    ("train", ["{mine}:takes_two", "--data-dir", "{data}", "--out", "{missing}/a",
               "--device", "cpu", "--batch-size", "16"], "cannot run a batch of shape (1, 1, 8, 8) (TypeError"),
    ("bench", ["{mine}:returns_dict", "--input-size", "3,8,8", "--batch-size", "2"],
     "returns a dict"),
    ("bench", ["{mine}:takes_two", "--input-size", "3,8,8", "--batch-size", "2"],
     "missing 1 required positional argument: 'mask'"),
    ("export", ["{mine}:returns_dict", "--input-size", "3,8,8", "--format", "onnx", "--out",
                "{fresh}/d.onnx"], "returns a dict"),
    ("export", ["{mine}:takes_two", "--input-size", "3,8,8", "--format", "onnx", "--out",
                "{fresh}/d.onnx"], "cannot run a batch"),
    ("profile", ["{exits}:f", "--input-size", "3,8,8"], "called sys.exit(7)"),
    ("train", ["{exits}:f", "--data-dir", "{data}", "--out", "{missing}/a", "--batch-size",
               "16"],
     "called sys.exit(7)"),
    # what a hostile user found: a model whose forward exits, records a run never wrote,
    # an output refused only after the work, options added since the table was written
    ("profile", ["{mine}:exits_in_forward", "--input-size", "3,8,8"],
     "the model's own code called sys.exit(7) while deeproots ran it"),
    ("export", ["{mine}:exits_in_forward", "--input-size", "3,8,8", "--format", "pt2",
                "--out", "{fresh}/e.pt2"], "called sys.exit(7)"),
    ("plot-results", ["{list_records}", "--curves", "--out", "{fresh}/c.png"],
     "metrics.jsonl: line 1 is a JSON list; a run writes step and epoch records"),
    ("plot-results", ["{bare_records}", "--curves", "--out", "{fresh}/c.png"],
     "line 1 is a 'step' record without step, train_loss, lr"),
    ("plot-results", ["{no_records}", "--curves", "--out", "{fresh}/c.png"],
     "metrics.jsonl holds no records yet"),
    ("plot-results", ["{list_summary}", "--curves", "--out", "{fresh}/c.png"],
     "summary.json is not a deeproots summary.json (a JSON list, not an object)"),
    ("plot-results", ["{list_summary}", "--out", "{fresh}/c.png"],
     "is not a deeproots summary.json (a JSON list"),
    ("train", ["nin-root-4", "--tensorboard", "--data-dir", "{data}", "--out", "{tb_file}",
               "--batch-size", "16", "--overwrite"], "tensorboard is a file; give a folder"),
    ("export", ["nin", "--format", "onnx", "--out", "{missing}/sub/m.onnx"],
     "the folder {missing}/sub does not exist; make it first"),
    ("export", ["nin", "--format", "aoti", "--out", "{fresh}/m.so"],
     "--format aoti writes a package that torch loads by a name ending in .pt2"),
    ("bench", ["nin", "--path", "aoti", "--dtype", "bfloat16", "--batch-size", "2"],
     "path 'aoti' runs float32 only"),
    ("train", ["--init", "{missing}/i.pt", "--out", "{missing}/a"],
     "init {missing}/i.pt: no such checkpoint file"),
    ("train", ["nin", "--distill", "{missing}/t.pt", "--out", "{missing}/a"],
     "distill {missing}/t.pt: no such checkpoint file"),
    ("train", ["nin", "--learn-groups", "root8", "--data-dir", "{data}", "--out", "{missing}/a",
               "--batch-size", "16"], "schedule must be root-N, tree-N or col-N"),
    ("train", ["nin", "--distill-weight", "0.9", "--out", "{missing}/a"],
     "sets the --distill part of training, but distill is not given"),
    ("train", ["--resume"], "--resume continues the run in --out: give --out DIR"),
    ("rootify", ["{ckpt}", "--schedule", "root-8", "--data", "mnist"], "unknown data 'mnist'"),
    ("rootify", ["{ckpt}", "--schedule", "root-8", "--model", "{missing}/m.py:f"],
     "no file"),
    ("rootify", ["{missing}/bst.pt", "--schedule", "root-8"], "bst.pt: no such file"),
    # names, choices and devices are refused before any data is looked for
    ("train", ["nin", "--device", "cuda:x", "--out", "{missing}/a", "--data-dir", "{missing}"],
     "device must be auto, cpu, cuda or cuda:N"),
]
COMMANDS = sorted({c for c, _, _ in CASES})


def test_every_command_is_in_the_table():
    from deeproots.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == COMMANDS


@pytest.mark.parametrize("command, argv, phrase", CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, command, argv, phrase):
    before = _snapshot(world["run"])
    rc, err = run_cli([command, *(a.format(**world) for a in argv)], capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deeproots {command}: error: "), err
    assert phrase.format(**world) in lines[0]
    assert "Traceback" not in err
    assert _snapshot(world["run"]) == before
    assert not os.path.exists(os.path.join(world["missing"], "a", "last.pt"))
    assert os.listdir(world["fresh"]) == []  # a refused command leaves no file, whole or part


def test_a_checkpoint_given_as_the_model_is_exported_as_eval_and_rootify_take_it(world,
                                                                                  tmp_path):
    """``deeproots export RUN/last.pt --format pt2`` (no model name, no --checkpoint): the
    program computes what the trained model of the checkpoint does, at its 1x8x8 images."""
    import torch

    from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint

    out = tmp_path / "m.pt2"
    assert main(["export", world["ckpt"], "--format", "pt2", "--out", str(out)]) == 0
    trained = model_from_checkpoint(load_checkpoint(world["ckpt"]), world["ckpt"]).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(x)
        assert torch.allclose(got, trained(x), rtol=1e-4, atol=1e-5)


def test_an_eval_batch_too_large_for_memory_is_one_line(world, capsys, monkeypatch):
    """nin-root-4 at 1x8x8 needs 4 x (64 + 3 x 192x8x8) = 147,712 bytes an image to
    evaluate; the 16 test images of the default batch (256, at most the split) need 2.25 MiB,
    and with 1 MiB free 7 fit."""
    import deeproots.runtime as R

    monkeypatch.setattr(R, "bytes_free", lambda device: 2**20)
    rc, err = run_cli(["eval", world["ckpt"], "--device", "cpu", "--data-dir", world["data"]],
                      capsys)
    assert rc == 2 and err.strip() == (
        "deeproots eval: error: batch size 16 needs about 2 MiB of activations to evaluate "
        "nin-root-4; 1 MiB is free on cpu. The largest batch that fits is about 7"), err


def test_json_into_a_closed_pipe_ends_quietly():
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m deeproots profile resnet50 --json --per-layer"
                          f" | head -c 10", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    assert done.stdout.startswith("{")


def test_a_full_disk_is_one_line(monkeypatch, tmp_path):
    import errno

    from deeproots import runtime

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"no space left on the device to write .*x.bin; the old "
                                      r"file, if any, is kept"):
        runtime.atomic_write(tmp_path / "x.bin", lambda f: f.write(b"1"))
    assert list(tmp_path.iterdir()) == []


def test_the_allocator_keeps_a_users_preload(monkeypatch):
    from deeproots import runtime

    seen = {}
    monkeypatch.setattr(runtime, "jemalloc_path", lambda: "/lib/libjemalloc.so.2")
    monkeypatch.setattr(runtime.os, "execve", lambda exe, argv, env: seen.update(env))
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    runtime.use_fast_allocator(["list"], "auto")
    assert seen["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /opt/mine.so"
    assert "dirty_decay_ms:-1" in seen["MALLOC_CONF"]


def test_a_defect_inside_deeproots_keeps_its_traceback(monkeypatch, capsys):
    """Only deeproots' own errors (DeeprootsError) are one line; a bug shows its traceback
    and asks to be reported, instead of passing for bad input."""
    import deeproots.models.registry as R

    def broken(pattern="*"):
        raise KeyError("a bug")

    monkeypatch.setattr(R, "list_models", broken)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug'" in err
    assert "internal error" in err and "please report it" in err


def test_profile_bench_and_roofline_take_a_checkpoint_as_its_trained_model(world, capsys):
    """The run is nin-root-4 trained on 1x8x8 images: each command counts and times that
    model (its groups, its channels, its size), labelled by the checkpoint's path; a model
    name at --input-size 1,8,8 is built for one channel, as these commands have no
    --in-channels."""
    import json

    import deeproots

    trained = deeproots.profile(deeproots.create_model("nin-root-4", in_channels=1), (1, 8, 8))
    assert main(["profile", world["ckpt"], "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert counted["input_size"] == [1, 8, 8] and counted["macs"] == trained.macs
    assert counted["params"] == trained.params
    assert main(["bench", world["ckpt"], "nin", "--input-size", "1,8,8", "--batch-size", "4",
                 "--repeats", "1", "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [world["ckpt"], "nin"]
    dense = deeproots.profile(deeproots.create_model("nin", in_channels=1), (1, 8, 8)).macs
    assert rows[1]["ideal_speedup"] == pytest.approx(trained.macs / dense)
    assert main(["roofline", world["ckpt"], "--device", "h100", "--batch-size", "2",
                 "--json"]) == 0
    (line,) = json.loads(capsys.readouterr().out)
    assert line["model"] == world["ckpt"]
    assert sum(layer["macs"] for layer in line["layers"]) == pytest.approx(
        2 * trained.macs, rel=0.01)


def test_a_backbone_from_the_command_line(world, tmp_path, capsys):
    """profile and export --features-only: resnet50's stem and layer1 alone, their parameters
    summed from the whole network's by module name; the trained checkpoint's stages 1 and 2
    exported to ONNX, each map what the trained model's intermediates are."""
    import json

    import torch

    import deeproots
    from deeproots.speed.export import load_exported
    from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint

    assert main(["profile", "resnet50", "--features-only", "--out-indices", "1",
                 "--json"]) == 0
    full = deeproots.create_model("resnet50")  # profile counts conv weights (no batch norm)
    kept = sum(m.weight.numel() for n, m in full.named_modules()
               if isinstance(m, torch.nn.Conv2d) and n.split(".")[0] in ("conv1", "layer1"))
    assert json.loads(capsys.readouterr().out)["params"] == kept
    out = tmp_path / "b.onnx"
    assert main(["export", world["ckpt"], "--features-only", "--out-indices", "1", "2",
                 "--format", "onnx", "--out", str(out)]) == 0
    trained = model_from_checkpoint(load_checkpoint(world["ckpt"]), world["ckpt"]).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = trained.forward_intermediates(x, [1, 2], intermediates_only=True)
    got = load_exported(out, "onnx")(x)
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4)
