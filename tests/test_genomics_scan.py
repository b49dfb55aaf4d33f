"""Genome scans (genomics.scan, `genomics scan`), BED coordinates in `classify`, AUROC / AUPRC in `evaluate`, and the
k-mer model (`genomics fit --model kmer`)."""

import shutil

import numpy as np
import pyfaidx
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from cli import app
from conftest import SHARED_DATASETS
from genomics import KmerClassifier, load_bed
from genomics.inference import Evaluation, evaluate_classifier, load_classifier, ranking_scores
from genomics.data import SequenceData
from genomics.scan import scan, window_starts

runner = CliRunner()
CHR22 = "22:20000001-21000000"
BED = "gb_test_positives_in_hisat2_chr22.bed"


def invoke(*args):
    return runner.invoke(app, ["genomics", *map(str, args)])


class Recorder:
    """A stand-in classifier that scores a window by its GC content and remembers every window it was given."""

    classes_ = np.array([0, 1])
    max_length_ = 251

    def __init__(self):
        self.seen = []

    def predict_proba(self, sequences):
        self.seen.extend(sequences)
        gc = np.array([sum(base in "GCgc" for base in s) / len(s) for s in sequences])
        return np.stack([1 - gc, gc], axis=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The chr22 excerpt copied where its index may be written, and its positives BED."""
    folder = tmp_path_factory.mktemp("reference")
    shutil.copy(SHARED_DATASETS / "reference_fasta" / "hisat2_22_20-21M.fa", folder / "chr22.fa")
    shutil.copy(SHARED_DATASETS / "reference_fasta" / BED, folder / BED)
    return folder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORYCORE_CACHE_DIR", str(tmp_path / "cache"))


def test_window_starts_cover_every_base():
    assert list(window_starts(10, 4, 4)) == [0, 4, 6]
    assert list(window_starts(12, 4, 4)) == [0, 4, 8]
    assert list(window_starts(10, 4, 3)) == [0, 3, 6]
    assert list(window_starts(3, 5, 2)) == [0]
    for length, window, step in ((1000, 251, 50), (999, 100, 100), (17, 5, 7)):
        starts = list(window_starts(length, window, step))
        covered = np.zeros(length, bool)
        for start in starts:
            covered[start:start + window] = True
        assert covered.all() == (step <= window) and starts[-1] + window == length


def test_scan_windows_have_the_fasta_coordinates_and_skip_gaps(reference):
    recorder = Recorder()
    batches = list(scan(recorder, reference / "chr22.fa", window=2000, step=1500, batch_size=64))
    chrom = sum((b.chrom for b in batches), [])
    start, end = (np.concatenate([getattr(b, name) for b in batches]) for name in ("start", "end"))
    skipped = sum(b.skipped for b in batches)
    truth = pyfaidx.Fasta(str(reference / "chr22.fa"), indexname=str(reference / "own.fai"))[CHR22]
    assert set(chrom) == {CHR22} and end[-1] == len(truth) == 1_000_000
    assert (end - start <= 2000).all() and np.all(np.diff(start) > 0)
    # every window scored is the FASTA's sequence at its coordinates; the all-N gap windows were left out
    assert recorder.seen == [truth[int(b):int(e)].seq for b, e in zip(start, end)]
    assert skipped > 0 and len(start) + skipped == len(list(window_starts(1_000_000, 2000, 1500)))
    assert all(set(truth[s:s + 2000].seq.upper()) == {"N"} for s in range(0, 1_000_000 - 2000, 1500)
               if s not in set(start.tolist()))


def test_scan_inside_bed_regions_reads_the_known_sequences(reference):
    """Windows of 251 bp: each 251 bp region is one window, read strand-aware (the published GenomicBenchmarks
    sequences); a 500 bp region gets two, the second ending at its end."""
    recorder = Recorder()
    data = load_bed(reference / "chr22.fa", reference / BED)
    lines = [line.split("\t") for line in (reference / BED).read_text().splitlines() if not line.startswith("#")]
    batches = list(scan(recorder, reference / "chr22.fa", window=251, step=251, bed=reference / BED))
    rows = [(c, int(b), int(e), s) for batch in batches
            for c, b, e, s in zip(batch.chrom, batch.start, batch.end, batch.strand)]
    expected = []
    for line, sequence in zip(lines, data.sequences):
        chrom, start, end, strand = line[0], int(line[1]), int(line[2]), line[5]
        if end - start == 251:
            expected.append((chrom, start, end, strand))
            assert recorder.seen[len(expected) - 1] == sequence
        else:
            assert end - start == 500
            expected += [(chrom, start, start + 251, strand), (chrom, end - 251, end, strand)]
            assert recorder.seen[len(expected) - 1] == sequence[-251:]
    assert rows == expected and expected[0][3] == "-"


def test_ranking_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    truth = rng.choice(["neg", "pos"], 200)
    proba = rng.dirichlet([1, 1], 200)
    proba[truth == "pos", 1] += 0.3
    proba /= proba.sum(1, keepdims=True)
    auroc, auprc = ranking_scores(truth, proba, np.array(["neg", "pos"]))
    assert auroc == pytest.approx(roc_auc_score(truth == "pos", proba[:, 1]), abs=1e-12)
    assert auprc == pytest.approx(average_precision_score(truth == "pos", proba[:, 1]), abs=1e-12)

    classes = np.array([0, 1, 2])
    truth = rng.integers(0, 3, 300)
    proba = rng.dirichlet([1, 1, 1], 300)
    auroc, auprc = ranking_scores(truth, proba, classes)
    assert auroc == pytest.approx(roc_auc_score(truth, proba, multi_class="ovr", average="macro"), abs=1e-12)
    onehot = np.eye(3)[truth]
    assert auprc == pytest.approx(average_precision_score(onehot, proba, average="macro"), abs=1e-12)
    assert np.isnan(ranking_scores(np.zeros(5, int), proba[:5], classes)).all()


@pytest.fixture(scope="module")
def kmer_model(tmp_path_factory):
    rng = np.random.default_rng(1)
    sequences, labels = [], []
    for i in range(120):
        bases = list(rng.choice(list("ACGT"), 60))
        if i % 2:
            bases[20:28] = "TATAAAAG"
        sequences.append("".join(bases))
        labels.append(i % 2)
    path = tmp_path_factory.mktemp("kmer") / "kmer.safetensors"
    KmerClassifier(k_max=6).fit(sequences, labels).save(path)
    return path, sequences, labels


def test_kmer_classifier_saves_loads_and_evaluates_like_scikit_learn(kmer_model):
    path, sequences, labels = kmer_model
    model = load_classifier(path)
    assert isinstance(model, KmerClassifier) and model.max_length_ == 60
    proba = model.predict_proba(sequences)
    report = evaluate_classifier(model, SequenceData([str(i) for i in range(120)], sequences, labels))
    assert isinstance(report, Evaluation) and report.accuracy > 0.9
    assert report.auroc == pytest.approx(roc_auc_score(labels, proba[:, 1]))
    assert report.auprc == pytest.approx(average_precision_score(labels, proba[:, 1]))
    assert "auroc" in report.to_text() and "class 1 against 0" in report.to_text()


def test_fit_kmer_scan_classify_and_evaluate_through_the_command_line(kmer_model, reference, tmp_path):
    _, sequences, labels = kmer_model
    (tmp_path / "train.csv").write_text("seq,label\n" + "".join(f"{s},{y}\n" for s, y in zip(sequences, labels)))
    result = invoke("fit", "--train", tmp_path / "train.csv", "--model", "kmer", "--out", tmp_path / "k.safetensors")
    assert result.exit_code == 0, result.output
    assert "2-7-mer linear model" in result.stdout

    result = invoke("evaluate", "--model", tmp_path / "k.safetensors", "--data", tmp_path / "train.csv")
    assert result.exit_code == 0, result.output
    assert "auroc      1.0000" in result.stdout and "auprc      1.0000" in result.stdout

    result = invoke("scan", reference / "chr22.fa", "--model", tmp_path / "k.safetensors", "--bed", reference / BED,
                    "--window", 100, "--step", 60, "--out", tmp_path / "scan.bedgraph", "--quiet")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "scan.bedgraph").read_text().splitlines()
    assert lines[0].startswith("track type=bedGraph")
    rows = [line.split("\t") for line in lines[1:]]
    regions = [line.split("\t") for line in (reference / BED).read_text().splitlines()[1:]]
    expected = [(r[0], start + int(r[1])) for r in regions
                for start in window_starts(int(r[2]) - int(r[1]), 100, 60)]
    assert [(row[0], int(row[1])) for row in rows] == expected
    assert all(int(row[2]) - int(row[1]) == 100 and 0 <= float(row[3]) <= 1 for row in rows)
    assert f"{len(rows)} windows of 100 bp every 60 bp" in result.stderr

    # off a terminal (CliRunner's stderr is not one) the bar gives way to a line at every tenth of the bases
    lambda_phage = SHARED_DATASETS / "reference_fasta" / "lambda_virus.fa"
    result = invoke("scan", lambda_phage, "--model", tmp_path / "k.safetensors", "--window", 500, "--batch-size", 10)
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if line.startswith("scanning: ")]
    assert 5 <= len(progress) <= 10 and progress[-1].startswith("scanning: 48,502 of 48,502 bp (100%)"), result.stderr
    assert len(result.stdout.splitlines()) == 1 + 98  # the track line, then 97 windows and one ending at the end

    result = invoke("scan", reference / "chr22.fa", "--model", tmp_path / "k.safetensors", "--bed", reference / BED,
                    "--format", "bed", "--class", "0", "--quiet")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0].split("\t")
    assert first[:3] == [CHR22, "307495", "307555"]  # the default window: the model's 60 bp training sequences
    assert first[5] == "-" and first[3] in ("0", "1") and 0 <= int(first[4]) <= 1000

    result = invoke("classify", reference / "chr22.fa", "--bed", reference / BED, "--model",
                    tmp_path / "k.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    header, *rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert header[:7] == ["#chrom", "start", "end", "id", "score", "strand", "predicted"]
    assert [row[:4] + [row[5]] for row in rows] == [[r[0], r[1], r[2], r[3], r[5]] for r in regions]


def test_new_commands_have_help_and_one_line_errors(kmer_model, reference, tmp_path):
    path = kmer_model[0]
    for command in ("scan", "fit", "classify", "evaluate"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.output
    (tmp_path / "gz.fa.gz").write_bytes(b"\x1f\x8b")
    for args, fragment in (
        (["scan", reference / "chr22.fa", "--model", path, "--window", 0], "--window must be >= 1, got 0"),
        (["scan", reference / "chr22.fa", "--model", path, "--format", "wig"], "--format must be bedgraph or bed"),
        (["scan", reference / "chr22.fa", "--model", path, "--class", "maybe"], "--class maybe is not a class"),
        (["scan", tmp_path / "missing.fa", "--model", path], "does not exist"),
        (["scan", tmp_path / "gz.fa.gz", "--model", path], "gzip-compressed FASTA"),
        (["scan", reference / "chr22.fa", "--model", path, "--out", reference / "chr22.fa"], "is an input file"),
        (["fit", "--train", tmp_path / "x.csv", "--out", tmp_path / "m.safetensors", "--model", "svm"],
         "--model must be neural or kmer"),
        (["scan", reference / "chr22.fa", "--model", path, "--threads", 0], "--threads must be >= 1, got 0"),
    ):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr
