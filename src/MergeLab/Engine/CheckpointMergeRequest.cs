using MergeLab.IO;
using MergeLab.Methods;
using static TorchSharp.torch;

namespace MergeLab.Engine;

/// <summary>What <see cref="CheckpointMerger"/> merges and where the result goes.</summary>
/// <remarks>Immutable, and so thread-safe to share between merges, as long as the <see cref="Experts"/>
/// list is not modified. <see cref="MethodForTensor"/> is called on the thread that calls
/// <see cref="CheckpointMerger.Merge"/>, once per tensor, before any tensor is read.</remarks>
public sealed record CheckpointMergeRequest
{
    /// <summary>The base (pretrained) checkpoint: a directory with <c>model.safetensors</c> or a sharded
    /// index, or a single <c>.safetensors</c> file. Optional for base-free methods such as weight averaging;
    /// given, it still sets the output's tensor names, order and dtypes, gives the tensors that are copied
    /// rather than merged (integer buffers), and must match the experts.</summary>
    public string? BaseModel { get; init; }

    /// <summary>The expert checkpoints, in the order the method's per-expert options refer to.</summary>
    public required IReadOnlyList<string> Experts { get; init; }

    /// <summary>The method that merges every tensor.</summary>
    public required MergeMethod Method { get; init; }

    /// <summary>Optional per-tensor methods (a config's gradients and filters give each tensor its own
    /// options); null uses <see cref="Method"/> for every tensor. Whole-model statistics always come from
    /// <see cref="Method"/>.</summary>
    public Func<string, MergeMethod>? MethodForTensor { get; init; }

    /// <summary>The output directory. It must not exist (unless <see cref="Overwrite"/>); its parent must.</summary>
    public required string OutputDirectory { get; init; }

    /// <summary>Replace an existing output directory once the new one is complete. Default false. Only a folder
    /// that looks like a merged checkpoint is replaced: no subfolders, only the files a merge may write
    /// (safetensors weights, their index, and the <c>.json</c>, <c>.txt</c>, <c>.model</c>, <c>.jinja</c> and
    /// <c>.tiktoken</c> files it copies) besides a file browser's own, and none of the inputs; any other is
    /// refused with a <see cref="MergeException"/> naming what it holds.</summary>
    public bool Overwrite { get; init; }

    /// <summary>The dtype of every floating-point output tensor; null keeps each base tensor's dtype.</summary>
    public ScalarType? OutputDType { get; init; }

    /// <summary>The most tensor bytes per output shard. Default 5,000,000,000 (transformers' "5GB").</summary>
    public long MaxShardBytes { get; init; } = ShardedCheckpointWriter.DefaultMaxShardBytes;

    /// <summary>The model directory whose non-weight files (config.json, tokenizer files,
    /// generation_config.json) are copied into the output; null means the base model's directory (or the
    /// first expert's for base-free methods). Set it to an empty string to copy nothing; a path that does
    /// not exist is a <see cref="MergeException"/> before anything is written. The copied
    /// config.json's <c>torch_dtype</c> (and <c>dtype</c>) name <see cref="OutputDType"/> when it is set.</summary>
    public string? CopyFilesFrom { get; init; }

    /// <summary>A model directory whose tokenizer files replace those of <see cref="CopyFilesFrom"/> (a
    /// config's <c>tokenizer_source</c>): every non-weight file there but config.json and
    /// generation_config.json, which still come from <see cref="CopyFilesFrom"/>, as mergekit does. Null
    /// (default): the tokenizer comes with the other files. A path that does not exist, or, when it is not
    /// the folder the other files come from, holds no tokenizer file, is a <see cref="MergeException"/> before
    /// anything is written.</summary>
    public string? TokenizerFilesFrom { get; init; }

    /// <summary>The device tensors are merged on; null means the CPU.</summary>
    public Device? Device { get; init; }

    /// <summary>How many tensor groups are read ahead while the current one merges. Default 2, at least 1.
    /// Peak memory is about (ReadAhead + 2) × (N + 1) × the largest tensor.</summary>
    public int ReadAhead { get; init; } = 2;

    /// <summary>Whether input tensors merged on the CPU are mapped from their files (private, copy-on-write
    /// mappings) instead of copied into memory. Default true.</summary>
    /// <remarks>
    /// <para>Mapping skips the copy of every input byte from the page cache, which is most of a copied
    /// read's cost: a 4 × 1.1B bfloat16 TIES merge on 2 cores took 3.9–4.8 s mapped against 5.5–7.1 s
    /// copied (warm page cache), and 7.5–12.3 s against 13.7–19.5 s reading from disk, with the same
    /// output bytes and about the same peak RSS (mapped pages count in RSS while their tensor lives).</para>
    /// <para>The cost is how a change to an input during the merge shows. A file that has changed size
    /// when a tensor is about to be read raises a <see cref="SafetensorsFormatException"/> either way, but
    /// one cut short while tensors mapped from it are being merged stops the process with a bus error
    /// (SIGBUS), as with any memory-mapped reader (Python's <c>safetensors</c> included). Set false where
    /// inputs may be rewritten during a merge. Tensors whose offset in the file is not a multiple of their
    /// element size, groups of tensors under 256 KiB in all (norms, biases: copying a few pages costs less
    /// than mapping and unmapping them), and every tensor merged on another device, are copied regardless.</para>
    /// </remarks>
    public bool MapInputs { get; init; } = true;

    /// <summary>Options for reading the input safetensors headers.</summary>
    public SafetensorsReadOptions? ReadOptions { get; init; }

    /// <summary>What to do when an input tensor holds NaN or ±∞. Default <see cref="NonFiniteInputs.Fail"/>:
    /// every floating-point input tensor is checked as it is first read (on the reader thread, so the
    /// check overlaps the merge), and the first bad one stops the merge with a
    /// <see cref="NonFiniteInputException"/> naming the tensor and its file.</summary>
    public NonFiniteInputs NonFinite { get; init => field = MergeLab.Options.Defined(value, nameof(NonFinite)); } = NonFiniteInputs.Fail;

    /// <summary>Test seam: the output writes fail, as on a full disk, once this many tensor bytes have
    /// been written. Null (the default) in real use.</summary>
    internal long? SimulatedDiskSpace { get; init; }

    /// <summary>Groups of fewer input bytes than this are read on the merge's reader thread one input after
    /// another and copied, not mapped (<see cref="CheckpointSet.SmallGroupBytes"/>). Tests set 0 to map and
    /// read in parallel even their small tensors.</summary>
    internal long SmallGroupBytes { get; init; } = CheckpointSet.DefaultSmallGroupBytes;
}

/// <summary>Progress of a checkpoint merge, reported on the thread that called
/// <see cref="CheckpointMerger.Merge"/> (so a synchronous <see cref="IProgress{T}"/> needs no locking). Immutable.</summary>
/// <param name="Stage">"statistics" for a whole-model pass, "merge" for the merge pass.</param>
/// <param name="Pass">The pass number within the stage (1-based).</param>
/// <param name="TensorsDone">Tensors finished in this pass.</param>
/// <param name="TensorCount">Tensors in the model.</param>
/// <param name="BytesDone">Input bytes read in this pass.</param>
/// <param name="BytesTotal">Input bytes one pass reads.</param>
/// <param name="Tensor">The tensor just finished.</param>
public readonly record struct CheckpointMergeProgress(string Stage, int Pass, int TensorsDone, int TensorCount, long BytesDone, long BytesTotal, string Tensor);

/// <summary>What a completed checkpoint merge wrote. Immutable.</summary>
/// <param name="OutputDirectory">The final output directory.</param>
/// <param name="TensorCount">Tensors written.</param>
/// <param name="BytesWritten">Tensor bytes written.</param>
/// <param name="Files">The files in the output directory, by name.</param>
/// <param name="StatisticPasses">Whole-model passes made before merging.</param>
public sealed record CheckpointMergeResult(string OutputDirectory, int TensorCount, long BytesWritten, IReadOnlyList<string> Files, int StatisticPasses);
