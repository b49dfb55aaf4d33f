"""Tokenizer, reverse complement and every loader of genomics.data, on fixture files written by the tests."""

import gzip
import os
import shutil
import stat

import numpy as np
import pytest

from genomics.baseline import kmer_logistic_regression
from genomics.data import (
    decode,
    encode,
    fasta_index_path,
    iter_bed_sequences,
    iter_fasta,
    load_bed,
    load_fasta,
    load_genomic_benchmarks,
    load_sequences,
    load_table,
    pad_tokens,
    reverse_complement,
    reverse_complement_tokens,
    split_windows,
)
from memorycore import InputError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # FASTA indexes go to a per-test cache, never to the shared data or the user's home.
    monkeypatch.setenv("MEMORYCORE_CACHE_DIR", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- tokenizer


def test_encode_maps_bases_soft_mask_and_iupac():
    assert encode("ACGTN").tolist() == [1, 2, 3, 4, 5]
    assert encode("acgtn").tolist() == [1, 2, 3, 4, 5]
    assert encode("RYSWKMBDHVryswkmbdhv").tolist() == [5] * 20
    assert decode(encode("ACgtNr")) == "ACGTNN"


@pytest.mark.parametrize("sequence, letter, position", [("ACGTX", "X", 5), ("AC-GT", "-", 3), ("ACGU", "U", 4),
                                                          ("AC GT", " ", 3), ("ACGé", "é", 4)])
def test_encode_names_record_and_position_of_unknown_letter(sequence, letter, position):
    with pytest.raises(InputError, match=rf"chr7: unknown letter '{letter}' at position {position} "):
        encode(sequence, record="chr7")


def test_encode_rejects_empty_and_non_string():
    with pytest.raises(InputError, match="empty"):
        encode("")
    with pytest.raises(InputError, match="DNA string"):
        encode(None)


def test_reverse_complement_text_keeps_case_and_iupac():
    assert reverse_complement("AACGTt") == "aACGTT"
    assert reverse_complement("RYKMBVDHSWN") == "NWSDHBVKMRY"
    sequence = "ACGTNacgtnRYKMBDHVSW"
    assert reverse_complement(reverse_complement(sequence)) == sequence


def test_reverse_complement_tokens_matches_text():
    rng = np.random.default_rng(0)
    sequence = "".join(rng.choice(list("ACGTNacgt"), 57))
    assert decode(reverse_complement_tokens(encode(sequence))) == decode(encode(reverse_complement(sequence)))


def test_pad_tokens_pads_and_truncates():
    padded, lengths = pad_tokens([encode("ACG"), encode("ACGTACGT")], 5)
    assert padded.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 1]]
    assert lengths.tolist() == [3, 5]


def test_split_windows_cover_the_sequence_with_half_overlap():
    tokens = np.arange(1, 24)
    windows = split_windows(tokens, 8)
    assert all(len(w) == 8 for w in windows)
    assert [int(w[0]) for w in windows] == [1, 5, 9, 13, 16]
    assert set(np.concatenate(windows).tolist()) == set(tokens.tolist())
    assert len(split_windows(tokens[:8], 8)) == 1


# ---------------------------------------------------------------------------------------------- GenomicBenchmarks


def _write_benchmark(root, split, classes):
    for name, sequences in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i, sequence in enumerate(sequences):
            (folder / f"{name}_{i}.txt").write_text(sequence + "\n")


def test_genomic_benchmarks_folder_sorted_classes(tmp_path):
    root = tmp_path / "toy_task"
    # Created in reverse order: label ids must follow sorted names, not creation or listing order.
    _write_benchmark(root, "train", {"positive": ["ACGT", "AACC"], "negative": ["TTTT"]})
    _write_benchmark(root, "test", {"positive": ["GGGG"], "negative": ["CCCC"]})
    train = load_genomic_benchmarks(root, split="train")
    assert train.labels == ["negative", "positive", "positive"]
    assert train.ids == ["negative/negative_0", "positive/positive_0", "positive/positive_1"]
    assert train.sequences == ["TTTT", "ACGT", "AACC"]
    assert load_genomic_benchmarks(root, split="test").sequences == ["CCCC", "GGGG"]
    assert load_sequences(root / "test").labels == ["negative", "positive"]  # a split folder directly


def test_genomic_benchmarks_bad_layouts(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_genomic_benchmarks(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        load_genomic_benchmarks(tmp_path / "empty")
    (tmp_path / "t" / "train" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="no .txt"):
        load_genomic_benchmarks(tmp_path / "t")
    (tmp_path / "t" / "train" / "a" / "x.txt").write_text("\n")
    with pytest.raises(InputError, match="x.txt is empty"):
        load_genomic_benchmarks(tmp_path / "t")
    with pytest.raises(InputError, match="has no 'test' split \\(it has train\\)"):
        load_genomic_benchmarks(tmp_path / "t", split="test")


# ---------------------------------------------------------------------------------------------- CSV / TSV


def test_table_csv_tsv_and_gzip(tmp_path):
    (tmp_path / "a.csv").write_text("seq,label\nACGT,0\nacgg,1\n")
    data = load_table(tmp_path / "a.csv")
    assert data.sequences == ["ACGT", "acgg"] and data.labels == [0, 1] and data.ids == ["row1", "row2"]
    with gzip.open(tmp_path / "b.tsv.gz", "wt") as handle:
        handle.write("id\tSequence\tclass\nx\tAC\tpromoter\ny\tGT\tenhancer\n")
    data = load_table(tmp_path / "b.tsv.gz")
    assert data.ids == ["x", "y"] and data.labels == ["promoter", "enhancer"]


def test_table_real_genomic_benchmarks_export(shared_datasets):
    path = shared_datasets / "genomic_benchmarks/sequences/human_ensembl_regulatory/train_subsample1500.tsv.gz"
    data = load_sequences(path, require_labels=True)
    assert len(data) == 1500 and sorted(set(data.labels)) == [0, 1, 2]


def test_table_errors(tmp_path):
    (tmp_path / "nocol.csv").write_text("dna_string,label\nACGT,0\n")
    with pytest.raises(InputError, match="no sequence column"):
        load_table(tmp_path / "nocol.csv")
    (tmp_path / "nolabel.csv").write_text("seq\nACGT\n")
    assert load_table(tmp_path / "nolabel.csv").labels is None
    with pytest.raises(InputError, match="no label column"):
        load_table(tmp_path / "nolabel.csv", require_labels=True)
    (tmp_path / "gap.csv").write_text("seq,label\nACGT,0\nACGA,\n")
    with pytest.raises(InputError, match="label missing in data row 2"):
        load_table(tmp_path / "gap.csv")
    (tmp_path / "header.csv").write_text("seq,label\n")
    with pytest.raises(InputError, match="no rows"):
        load_table(tmp_path / "header.csv")
    (tmp_path / "reads.fastq").write_text("@r1\nACGT\n+\nIIII\n")
    (tmp_path / "reads.fa").write_text("@r1\nACGT\n+\nIIII\n")
    (tmp_path / "labels.tsv").write_text("r1\t0\n")
    for read in (lambda: load_table(tmp_path / "reads.fastq"), lambda: list(iter_fasta(tmp_path / "reads.fa")),
                 lambda: load_sequences(tmp_path / "reads.fastq", labels=tmp_path / "labels.tsv")):
        with pytest.raises(InputError, match="looks like FASTQ"):
            read()
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="is empty"):
        load_table(tmp_path / "empty.csv")


# ---------------------------------------------------------------------------------------------- FASTA


def test_fasta_streams_records_with_labels(tmp_path):
    (tmp_path / "s.fa").write_text(">r1 first record\nACGT\nacgt\n\n>r2\nNNRY\n")
    (tmp_path / "labels.tsv").write_text("id\tlabel\nr2\tneg\nr1\tpos\nextra\tpos\n")
    assert list(iter_fasta(tmp_path / "s.fa")) == [("r1", "ACGTacgt"), ("r2", "NNRY")]
    data = load_fasta(tmp_path / "s.fa", labels=tmp_path / "labels.tsv")
    assert data.ids == ["r1", "r2"] and data.labels == ["pos", "neg"]
    with gzip.open(tmp_path / "s.fa.gz", "wt") as handle:
        handle.write(">a\nAC\n>b\nGT\n")
    assert load_sequences(tmp_path / "s.fa.gz").sequences == ["AC", "GT"]


def test_fasta_streaming_reports_progress(tmp_path):
    path = tmp_path / "s.fa"
    path.write_text("".join(f">r{i}\n{'ACGT' * 30}\n" for i in range(50)))
    seen = []
    records = iter_fasta(path, on_progress=seen.append)
    first = next(records)
    assert first[0] == "r0" and seen == []  # the generator reads lazily
    rest = list(records)
    assert len(rest) == 49 and seen[-1] == path.stat().st_size and seen == sorted(seen)


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("\n\n", "no FASTA records"),
    ("ACGT\n>r1\nAC\n", "before any '>' header"),
    (">r1\nAC\n>r1\nGT\n", "duplicate record id 'r1'"),
    (">r1\n>r2\nAC\n", "record 'r1' has no sequence"),
    (">\nAC\n", "has no id"),
])
def test_fasta_errors(tmp_path, text, message):
    path = tmp_path / "bad.fa"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        list(iter_fasta(path))


def test_fasta_missing_file_and_missing_labels(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_fasta(tmp_path / "nope.fa"))
    (tmp_path / "s.fa").write_text(">a\nAC\n>b\nGT\n>c\nTT\n")
    (tmp_path / "l.txt").write_text("a 1\n")
    with pytest.raises(InputError, match="no label for 2 of 3 records: 'b', 'c'"):
        load_fasta(tmp_path / "s.fa", labels=tmp_path / "l.txt")
    (tmp_path / "dup.txt").write_text("a,1\na,0\n")
    with pytest.raises(InputError, match="duplicate id 'a'"):
        load_fasta(tmp_path / "s.fa", labels=tmp_path / "dup.txt")
    assert load_fasta(tmp_path / "s.fa", labels=_labels(tmp_path, "a 1\nb 0\nc 1\n")).labels == [1, 0, 1]
    # "1.0" is an integer label as much as 1.0 is; labels may hold spaces, with any separator
    assert load_fasta(tmp_path / "s.fa", labels=_labels(tmp_path, "a,1.0\nb,0.0\nc,1\n")).labels == [1, 0, 1]
    for text in ("a\tno tata\nb\ttata\nc\ttata\n", "a no tata\nb tata\nc tata\n"):
        assert load_fasta(tmp_path / "s.fa", labels=_labels(tmp_path, text)).labels == ["no tata", "tata", "tata"]
    with pytest.raises(InputError, match=r"line 2 should hold an id and a label, separated by one '\\t'"):
        load_fasta(tmp_path / "s.fa", labels=_labels(tmp_path, "a\t1\nb\t0\ttrain\nc\t1\n"))


def _labels(tmp_path, text):
    path = tmp_path / "labels_ok.txt"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- FASTA + BED


@pytest.fixture
def chr22(shared_datasets, tmp_path):
    """The real 1 Mb GRCh37 chr22 excerpt, copied where an index may be written, and its verified BED."""
    folder = shared_datasets / "reference_fasta"
    fasta = tmp_path / "chr22.fa"
    shutil.copy(folder / "hisat2_22_20-21M.fa", fasta)
    return fasta, folder / "gb_test_positives_in_hisat2_chr22.bed"


def test_bed_regions_match_genomic_benchmarks_sequences(chr22, shared_datasets):
    import pandas as pd

    fasta, bed = chr22
    regions = dict(iter_bed_sequences(fasta, bed))
    assert list(regions) == ["FP018600", "FP018598", "test_positive_420", "test_positive_599",
                             "nontata_test_hfrow4428_id_unknown"]
    assert len(regions["FP018600"]) == 251 and len(regions["test_positive_420"]) == 500
    # The BED rows are GenomicBenchmarks test positives: strand-aware extraction must give them verbatim
    # (FP018600 lies on the minus strand, so this also checks the reverse complement).
    published = set(pd.read_csv(shared_datasets / "genomic_benchmarks/sequences/human_nontata_promoters/test.csv.gz")
                    .query("label == 1").seq.str.upper())
    for name in ("FP018600", "FP018598", "nontata_test_hfrow4428_id_unknown"):
        assert regions[name].upper() in published
    assert reverse_complement(regions["FP018600"]) not in published


def test_bed_coordinates_are_zero_based_half_open(tmp_path):
    (tmp_path / "g.fa").write_text(">chrA\nAACCGGTT\nACGT\n>chrB\nTTTT\n")
    (tmp_path / "r.bed").write_text("track name=x\n#comment\nchrA\t0\t4\tfirst\t0\t+\nchrA\t2\t6\tsecond\t0\t-\n"
                                    "chrA\t10\t12\nchrB 1 3\n")
    (tmp_path / "labels.tsv").write_text("first\t1\nsecond\t0\nchrA:10-12(+)\t1\nchrB:1-3(+)\t0\n")
    data = load_bed(tmp_path / "g.fa", tmp_path / "r.bed", labels=tmp_path / "labels.tsv")
    assert data.sequences == ["AACC", "CCGG", "GT", "TT"]
    assert data.ids == ["first", "second", "chrA:10-12(+)", "chrB:1-3(+)"]
    assert data.labels == [1, 0, 1, 0]


@pytest.mark.parametrize("bed_text, message", [
    ("chrZ\t0\t4\n", "names sequence 'chrZ', which is not in"),
    ("chrA\t8\t13\n", "ends past the end of 'chrA' \\(length 12\\)"),
    ("chrA\t4\t4\n", "empty or negative"),
    ("chrA\t-1\t4\n", "empty or negative"),
    ("chrA\tx\t4\n", "must be integers"),
    ("chrA\t1\n", "BED needs chrom, start, end"),
    ("chrA\t0\t4\ta\t0\t*\n", "strand must be"),
    ("chrA\t0\t4\ta\nchrA\t1\t5\ta\n", "duplicate region id 'a'"),
    ("#only a comment\n", "holds no regions"),
])
def test_bed_errors(tmp_path, bed_text, message):
    (tmp_path / "g.fa").write_text(">chrA\nAACCGGTT\nACGT\n")
    (tmp_path / "r.bed").write_text(bed_text)
    with pytest.raises(InputError, match=message):
        list(iter_bed_sequences(tmp_path / "g.fa", tmp_path / "r.bed"))


def test_bed_on_read_only_fasta_writes_no_index_beside_it(shared_datasets, tmp_path):
    folder = shared_datasets / "reference_fasta"
    fasta = folder / "hisat2_22_20-21M.fa"
    if os.access(folder, os.W_OK):  # make a read-only copy when the shared folder happens to be writable
        copy = tmp_path / "ro"
        copy.mkdir()
        shutil.copy(fasta, copy / fasta.name)
        fasta = copy / fasta.name
        copy.chmod(stat.S_IRUSR | stat.S_IXUSR)
    before = sorted(os.listdir(fasta.parent))
    regions = dict(iter_bed_sequences(fasta, folder / "gb_test_positives_in_hisat2_chr22.bed"))
    assert len(regions) == 5
    assert sorted(os.listdir(fasta.parent)) == before
    assert fasta_index_path(fasta).parent == tmp_path / "cache" / "fai"


def test_existing_fresh_index_beside_fasta_is_used(tmp_path):
    fasta = tmp_path / "g.fa"
    fasta.write_text(">chrA\nAACCGGTT\n")
    assert fasta_index_path(fasta).parent == tmp_path / "cache" / "fai"
    (tmp_path / "g.fa.fai").write_text("")  # an interrupted indexer's leftover is not an index
    assert fasta_index_path(fasta).parent == tmp_path / "cache" / "fai"
    (tmp_path / "g.fa.fai").write_text("chrA\t8\t6\t8\t9\n")
    assert fasta_index_path(fasta) == tmp_path / "g.fa.fai"


def test_fasta_for_regions_must_be_plain_and_evenly_wrapped(tmp_path):
    (tmp_path / "r.bed").write_text("chrA\t0\t4\tr\n")
    with gzip.open(tmp_path / "g.fa.gz", "wt") as handle:
        handle.write(">chrA\nAACCGGTT\n")
    with pytest.raises(InputError, match="gzip-compressed FASTA does not give; decompress it first"):
        list(iter_bed_sequences(tmp_path / "g.fa.gz", tmp_path / "r.bed"))
    (tmp_path / "ragged.fa").write_text(">chrA\nAACCGGTT\nACG\nAACCGGTT\n")
    with pytest.raises(InputError, match="every line of a record but its last to be equally long"):
        list(iter_bed_sequences(tmp_path / "ragged.fa", tmp_path / "r.bed"))


# ---------------------------------------------------------------------------------------------- baseline


def test_kmer_baseline_learns_a_motif():
    rng = np.random.default_rng(0)
    sequences, labels = [], []
    for i in range(120):
        bases = list(rng.choice(list("ACGT"), 40))
        if i % 2:
            start = rng.integers(0, 32)
            bases[start:start + 8] = "TATAAAAG"
        sequences.append("".join(bases))
        labels.append(i % 2)
    model = kmer_logistic_regression().fit(sequences[:80], labels[:80])
    assert model.score(sequences[80:], labels[80:]) >= 0.9
