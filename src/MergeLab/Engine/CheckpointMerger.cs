using System.Buffers;
using System.Collections.Concurrent;
using MergeLab.Config;
using MergeLab.IO;
using MergeLab.Methods;
using MergeLab.Selection;
using static TorchSharp.torch;

namespace MergeLab.Engine;

/// <summary>
/// Merges safetensors checkpoints tensor by tensor with bounded memory. At any moment it holds only the
/// tensors of the names in flight (the group being merged and <see cref="CheckpointMergeRequest.ReadAhead"/>
/// groups being read), so peak memory does not grow with the model. Reading the next tensors overlaps
/// the merge of the current one. Methods with a whole-model statistic get their passes first, streamed
/// the same way. The result is bit-identical to <see cref="MergeMethod.Merge"/> on the same inputs.
/// </summary>
/// <remarks>
/// <para>Everything is checked before any work starts: the inputs open, every expert has the reference's
/// tensor names and shapes, the output does not exist, and (where the file system supports it) the
/// output's full size is reserved on disk. Output is written to a hidden temporary directory beside the
/// target and renamed into place only when complete; a failure or cancellation removes it, releases
/// every tensor it read or made, and never touches the inputs. Input tensors holding NaN or ±∞ stop the
/// merge unless <see cref="CheckpointMergeRequest.NonFinite"/> says otherwise.</para>
/// <para>Thread-safe: independent merges (different outputs) may run concurrently in one process, and give
/// the same bytes as run alone; each uses one reader thread beside the caller's. Inputs are opened with
/// sharing for reading, so merges may share inputs. The inputs must not be modified in place during a
/// merge. With copied reads (<see cref="CheckpointMergeRequest.MapInputs"/> false) a change of size is
/// detected (a <see cref="SafetensorsFormatException"/>); with mapped reads (the default) it is detected
/// before a tensor is mapped, but a file cut short while its mapped tensors are being merged stops the
/// process with a bus error. A rewrite of the same size is never detected. Deleting or replacing an
/// input file is harmless where the system keeps open files readable (Linux, macOS; Windows with the
/// sharing MergeLab requests).</para>
/// </remarks>
public static class CheckpointMerger
{
    /// <summary>Merged tensors that may wait for the write-behind thread: enough to keep it busy while the
    /// next group merges; each is one output tensor, a fifth or less of its group's inputs.</summary>
    private const int WriteBehindTensors = 2;

    /// <summary>The end of the name of the hidden folder an <c>--overwrite</c> merge moves the old output to.</summary>
    private const string MovedAsideSuffix = ".old";

    /// <summary>The length of a merge's id (<see cref="NewId"/>).</summary>
    private const int IdLength = 32;

    /// <summary>The characters of a merge's id (<see cref="NewId"/>: <see cref="Guid.ToString(string)"/> with "N"
    /// writes lower case).</summary>
    private static readonly SearchValues<char> HexDigits = SearchValues.Create("0123456789abcdef");

    /// <summary>A fresh id for a merge's hidden folder: a <see cref="Guid"/> in "N" form, <see cref="IdLength"/>
    /// lower-case hex digits.</summary>
    private static string NewId() => Guid.NewGuid().ToString("N");

    /// <summary>The hidden sibling folders' common name start for <paramref name="output"/> (a full path):
    /// <c>.NAME.mergelab-</c>; a merge writes into that plus a fresh id, beside the output.</summary>
    private static string TemporaryName(string output) => $".{Path.GetFileName(output)}.mergelab-";

    /// <summary>
    /// The hidden folders beside <paramref name="outputDirectory"/> that merges into it leave behind when
    /// they are stopped at once (the process killed, a second Ctrl+C in the CLI): a merge's unfinished
    /// output, as large as the output can get, or, rarely, a previous output that <see cref="CheckpointMergeRequest.Overwrite"/>
    /// moved aside and could not move back. A merge into the same folder that is running now has one too,
    /// so they are reported, never deleted here.
    /// </summary>
    /// <param name="outputDirectory">The output directory, as given to a merge.</param>
    /// <returns>The folders found, in name order; empty when there are none or the parent cannot be read.</returns>
    public static IReadOnlyList<LeftoverFolder> FindLeftovers(string outputDirectory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(outputDirectory);
        var output = Path.TrimEndingDirectorySeparator(Path.GetFullPath(outputDirectory));
        if (Path.GetDirectoryName(output) is not { } parent)
        {
            return []; // a root folder: no merge writes beside it (CheckOutput refuses it)
        }

        var prefix = TemporaryName(output);
        try
        {
            // Compared by name, not as a search pattern: an output named with '*' or '?' must not match
            // others'. Case as the platform's paths (PathCase), as the search pattern compared it.
            return Directory.EnumerateDirectories(parent)
                .Select(path => (path, kind: LeftoverKind(Path.GetFileName(path), prefix)))
                .Where(found => found.kind is not null)
                .OrderBy(found => found.path, StringComparer.Ordinal)
                .Select(found => new LeftoverFolder(found.path, found.kind!.Value)).ToArray();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return [];
        }
    }

    /// <summary>Whether <paramref name="name"/> is <paramref name="prefix"/> followed by a merge's id
    /// (<see cref="NewId"/>) and, for a moved-aside output, <see cref="MovedAsideSuffix"/>: null if not, else
    /// whether it is a moved-aside output (<see cref="LeftoverFolder.IsPreviousOutput"/>). The prefix alone would
    /// also match the folders of an output whose name continues this one's (<c>.a.mergelab-</c> starts
    /// <c>.a.mergelab-x.mergelab-</c>).</summary>
    private static bool? LeftoverKind(string name, string prefix)
    {
        if (!name.StartsWith(prefix, PathCase.Comparison))
        {
            return null;
        }

        var id = name.AsSpan(prefix.Length);
        bool movedAside = id.EndsWith(MovedAsideSuffix, StringComparison.Ordinal);
        if (movedAside)
        {
            id = id[..^MovedAsideSuffix.Length];
        }

        return id.Length == IdLength && !id.ContainsAnyExcept(HexDigits) ? movedAside : null;
    }

    /// <summary>Runs the merge described by <paramref name="request"/>.</summary>
    /// <exception cref="MergeException">Inputs are inconsistent, the method failed on a tensor, writing a
    /// tensor failed (a full disk), or reading one failed for a reason other than its format; the message
    /// and <see cref="MergeException.TensorName"/> name the tensor. Or the output directory exists, or
    /// <see cref="CheckpointMergeRequest.CopyFilesFrom"/> or <see cref="CheckpointMergeRequest.TokenizerFilesFrom"/>
    /// does not exist (checked before anything is written).</exception>
    /// <exception cref="NonFiniteInputException">An input tensor holds NaN or ±∞ and
    /// <see cref="CheckpointMergeRequest.NonFinite"/> is <see cref="NonFiniteInputs.Fail"/> (the default).</exception>
    /// <exception cref="SafetensorsFormatException">An input file is malformed, or was truncated or changed
    /// size during the merge, before the tensor being read was read or mapped; then
    /// <see cref="SafetensorsFormatException.TensorName"/> says which tensor that was.</exception>
    /// <exception cref="IOException">The output cannot be created (e.g. the disk has no room for the whole
    /// checkpoint, which is reserved before merging where the file system supports it) or completed; or an
    /// input is missing (<see cref="FileNotFoundException"/>, <see cref="DirectoryNotFoundException"/>).</exception>
    /// <exception cref="ArgumentException">The request has no output directory, or an option is out of
    /// range (<see cref="ArgumentOutOfRangeException"/>: <see cref="CheckpointMergeRequest.MaxShardBytes"/>
    /// below 1, <see cref="CheckpointMergeRequest.ReadAhead"/> below 1).</exception>
    /// <exception cref="OperationCanceledException">Cancelled; nothing was written.</exception>
    public static CheckpointMergeResult Merge(CheckpointMergeRequest request, IProgress<CheckpointMergeProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentException.ThrowIfNullOrWhiteSpace(request.OutputDirectory);
        DTypeNames.RequireFloating(request.OutputDType, nameof(request.OutputDType)); // before any pass, not at the first tensor
        var output = Path.TrimEndingDirectorySeparator(Path.GetFullPath(request.OutputDirectory));
        // The named sources of non-weight files first: overwriting looks into them for links into the output.
        var sources = new FileSources(
            request.CopyFilesFrom is { } copyFrom ? SourceFolder(copyFrom, "CopyFilesFrom", " (an empty string copies nothing)") : null,
            SourceFolder(request.TokenizerFilesFrom, "The tokenizer source", ""));
        CheckOutput(request, output);
        if (request.ReadAhead < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(request), request.ReadAhead, "ReadAhead must be at least 1.");
        }

        if (request.MaxShardBytes < 1)
        {
            // The writer checks it too, but only after the statistic passes.
            throw new ArgumentOutOfRangeException(nameof(request), request.MaxShardBytes, "MaxShardBytes must be at least 1.");
        }

        var inputs = new List<SafetensorsCheckpoint>();
        try
        {
            var baseCheckpoint = request.BaseModel is null ? null : Open(request.BaseModel, request, inputs);
            var experts = request.Experts.Select(p => Open(p, request, inputs)).ToArray();
            var model = new CheckpointSet(baseCheckpoint, experts, request.Method.RequiresBase) { MapInputs = request.MapInputs, SmallGroupBytes = request.SmallGroupBytes };
            var methods = model.Names.ToDictionary(n => n, n => request.MethodForTensor?.Invoke(n) ?? request.Method, StringComparer.Ordinal);
            return Run(request, model, methods, output, sources, progress, cancellationToken);
        }
        finally
        {
            foreach (var c in inputs)
            {
                c.Dispose();
            }
        }
    }

    private static CheckpointMergeResult Run(CheckpointMergeRequest request, CheckpointSet model, Dictionary<string, MergeMethod> methods,
        string output, FileSources sources, IProgress<CheckpointMergeProgress>? progress, CancellationToken ct)
    {
        var device = request.Device ?? CPU;

        // A separate tokenizer source gives every file but config.json and generation_config.json.
        string filesFrom = sources.CopyFrom ?? Folder(model.Reference.Path); // the base, else the first expert
        string tokenizerFrom = sources.TokenizerFrom;
        bool separateTokenizer = tokenizerFrom.Length > 0 && !PathCase.Comparer.Equals(tokenizerFrom, filesFrom);
        if (separateTokenizer)
        {
            CheckTokenizerSource(request.TokenizerFilesFrom!, tokenizerFrom, filesFrom);
        }

        string temp = Path.Combine(Path.GetDirectoryName(output)!, TemporaryName(output) + NewId());
        Directory.CreateDirectory(temp);
        try
        {
            // The small non-weight files go first, so a problem with them (a link out of the model folder)
            // stops the merge before the long part rather than after it. The merge writes only weights,
            // which are never among them.
            if (filesFrom.Length > 0)
            {
                NonWeightFiles.Copy(filesFrom, temp, include: separateTokenizer ? NonWeightFiles.IsModelFile : null);
            }

            if (separateTokenizer)
            {
                NonWeightFiles.Copy(tokenizerFrom, temp, include: name => !NonWeightFiles.IsModelFile(name));
            }

            if (request.OutputDType is { } outputType)
            {
                NonWeightFiles.SetConfigDType(Path.Combine(temp, "config.json"), outputType);
            }

            // The inputs are checked for NaN and ±∞ on the first pass over them, whichever it is.
            bool checkFinite = request.NonFinite == NonFiniteInputs.Fail;
            var statistic = request.Method.CreateStatistic(model.Experts.Count);
            int passes = 0;
            while (statistic is { IsComplete: false })
            {
                passes++;
                bool check = checkFinite;
                Stream(model, device, request.ReadAhead, "statistics", passes, _ => check, progress, statistic.Observe, ct);
                checkFinite = false;
                statistic.EndPass();
            }

            var layout = model.Names.Select(n => model.OutputLayout(n, request.OutputDType)).ToArray();
            long written;
            using (var writer = new PlannedCheckpointWriter(temp, layout, request.MaxShardBytes) { SimulatedDiskSpace = request.SimulatedDiskSpace })
            {
                // Reading, merging and writing overlap: the reader thread runs ReadAhead groups ahead, and
                // the write-behind thread writes merged tensors while the next group is merged.
                using (var behind = new WriteBehind(writer, temp, WriteBehindTensors, ct))
                {
                    // A method whose kernels may vouch for its inputs (FiniteWitness) has them checked after
                    // its merge, and only those not vouched for: one read of every input less.
                    // (Only on the CPU: no kernel vouches elsewhere.)
                    bool Deferred(string name) => checkFinite && device.type == TorchSharp.DeviceType.CPU && methods[name].MayVouchForFiniteInputs;
                    // A merged tensor that a CPU kernel writes (CpuTensors.WriteKernelResult) is placed in
                    // memory as its bytes lie in the file, so the writer sends them from that memory instead of
                    // copying them into its staging buffer first.
                    Stream(model, device, request.ReadAhead, "merge", 1, name => checkFinite && !Deferred(name), progress, group =>
                    {
                        using var placement = CpuTensors.PlaceResults(writer.FileOffset(group.Name));
                        var type = model.MergeType(group.Name, request.OutputDType);
                        behind.Add(group.Name, Deferred(group.Name)
                            ? MergeThenCheck(model, methods[group.Name], group, statistic, type)
                            : methods[group.Name].MergeTensor(group, statistic, type));
                    }, ct, Deferred);
                    behind.Complete();
                }

                ct.ThrowIfCancellationRequested();
                writer.Complete();
                written = writer.TotalSize;
            }

            ct.ThrowIfCancellationRequested();
            MoveIntoPlace(temp, output, request.Overwrite);
            var files = Directory.GetFiles(output).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
            return new CheckpointMergeResult(output, model.Names.Count, written, files!, passes);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    /// <summary>Merges <paramref name="group"/>, then checks for NaN and ±∞ the inputs that the method's
    /// kernels did not vouch for. If the merge fails, the inputs are checked first, so that a non-finite
    /// input is reported as such rather than as whatever it made the method do.</summary>
    private static Tensor MergeThenCheck(CheckpointSet model, MergeMethod method, TensorGroup group, ModelStatistic? statistic, ScalarType? outputType)
    {
        using var witness = FiniteWitness.Begin();
        Tensor merged;
        try
        {
            merged = method.MergeTensor(group, statistic, outputType);
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            FiniteCheck.Require(model, group, witness: null);
            throw;
        }

        try
        {
            FiniteCheck.Require(model, group, witness);
        }
        catch
        {
            merged.Dispose();
            throw;
        }

        return merged;
    }

    /// <summary>Reads every tensor group in name order on a background reader, <paramref name="readAhead"/>
    /// groups ahead (checking for NaN and ±∞ those for which <paramref name="checkFinite"/> says so, the others
    /// being checked by <paramref name="consume"/> where <paramref name="checkedAfter"/> says so), and hands each to
    /// <paramref name="consume"/>, disposing it afterwards. An error on either side stops both at once and
    /// is thrown naming the tensor it happened on.</summary>
    private static void Stream(CheckpointSet model, Device device, int readAhead, string stage, int pass, Func<string, bool> checkFinite,
        IProgress<CheckpointMergeProgress>? progress, Action<TensorGroup> consume, CancellationToken ct, Func<string, bool>? checkedAfter = null)
    {
        using var queue = new BlockingCollection<LoadedGroup>(readAhead);
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var reader = Task.Run(() =>
        {
            try
            {
                foreach (var name in model.Names)
                {
                    var group = Read(model, name, device, checkFinite(name));
                    try
                    {
                        queue.Add(group, stop.Token);
                    }
                    catch
                    {
                        group.Dispose();
                        throw;
                    }
                }
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                // Stop the consumer now rather than after it has merged the groups already queued.
                stop.Cancel();
                throw;
            }
            finally
            {
                queue.CompleteAdding();
            }
        }, stop.Token);

        long bytesTotal = model.BytesPerPass, bytesDone = 0;
        int done = 0;
        try
        {
            foreach (var loaded in queue.GetConsumingEnumerable(stop.Token))
            {
                using (loaded)
                {
                    try
                    {
                        consume(loaded.Group);
                    }
                    catch (Exception e) when (e is not OperationCanceledException and not MergeException)
                    {
                        string what = stage == "merge" ? "merging" : "computing the whole-model statistic";
                        throw new MergeException(loaded.Group.Name, $"{what} failed: {e.Message}", e);
                    }
                }

                bytesDone += model.Bytes(loaded.Group.Name);
                progress?.Report(new CheckpointMergeProgress(stage, pass, ++done, model.Names.Count, bytesDone, bytesTotal, loaded.Group.Name));
                ct.ThrowIfCancellationRequested();
            }

            reader.GetAwaiter().GetResult(); // surfaces a read error
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            // Not the caller's cancellation: the reader failed and stopped the pass. Throw its error.
            // Stop the reader first, so one blocked on a full queue returns.
            stop.Cancel();
            try
            {
                reader.Wait(CancellationToken.None);
            }
            catch (AggregateException)
            {
            }

            // Groups read before the one that failed, whose check was left to their merge, are checked now,
            // in order: a NaN in one of them is the first problem, as a check on reading would have found.
            while (checkedAfter is not null && queue.TryTake(out var left))
            {
                using (left)
                {
                    if (checkedAfter(left.Group.Name))
                    {
                        FiniteCheck.Require(model, left.Group, witness: null);
                    }
                }
            }

            reader.GetAwaiter().GetResult();
            throw;
        }
        finally
        {
            stop.Cancel();
            try
            {
                reader.Wait(CancellationToken.None);
            }
            catch (AggregateException)
            {
                // The reader's own error (or its cancellation) is secondary to the one being thrown.
            }

            while (queue.TryTake(out var left))
            {
                left.Dispose();
            }
        }
    }

    /// <summary>Writes merged tensors into a <see cref="PlannedCheckpointWriter"/> on a background thread,
    /// at most <c>capacity</c> tensors behind the merge, so writing (a direct or buffered write, from the
    /// tensor's placed memory or through the writer's staging buffer) overlaps merging. It owns every tensor handed to
    /// <see cref="Add"/> and disposes it once written or abandoned. A write error stops it and is thrown,
    /// naming the tensor, by the next <see cref="Add"/> or by <see cref="Complete"/>.</summary>
    private sealed class WriteBehind : IDisposable
    {
        private readonly BlockingCollection<(string Name, Tensor Tensor)> _queue;
        private readonly CancellationTokenSource _stop;
        private readonly Task _task;

        public WriteBehind(PlannedCheckpointWriter writer, string temp, int capacity, CancellationToken ct)
        {
            _queue = new BlockingCollection<(string, Tensor)>(capacity);
            _stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            var stop = _stop;
            _task = Task.Factory.StartNew(() =>
            {
                try
                {
                    foreach (var (name, tensor) in _queue.GetConsumingEnumerable(stop.Token))
                    {
                        using (tensor)
                        {
                            try
                            {
                                writer.Write(name, tensor);
                            }
                            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                            {
                                throw new MergeException(name, $"writing the merged tensor to '{temp}' failed: {e.Message}", e);
                            }
                        }
                    }
                }
                catch
                {
                    // Wake a merge blocked on a full queue.
                    stop.Cancel();
                    throw;
                }
            }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }

        /// <summary>Queues <paramref name="tensor"/> (ownership passes here), waiting while the queue is full.</summary>
        public void Add(string name, Tensor tensor)
        {
            try
            {
                ThrowIfFailed();
                _queue.Add((name, tensor), _stop.Token);
            }
            catch
            {
                tensor.Dispose();
                if (_stop.IsCancellationRequested)
                {
                    // Woken by the writer's failure (or a cancellation): let it finish so its error,
                    // not a bare cancellation, is what this throws.
                    WaitForWriter();
                }

                ThrowIfFailed();
                throw;
            }
        }

        /// <summary>Waits until every queued tensor is written; throws the first write error.</summary>
        public void Complete()
        {
            _queue.CompleteAdding();
            _task.GetAwaiter().GetResult();
        }

        /// <summary>Stops the thread and disposes the tensors it did not write.</summary>
        public void Dispose()
        {
            _stop.Cancel();
            WaitForWriter(); // its error was thrown by Add or Complete, or is secondary to the one being thrown
            while (_queue.TryTake(out var left))
            {
                left.Tensor.Dispose();
            }

            _queue.Dispose();
            _stop.Dispose();
        }

        /// <summary>Waits for the writer thread to end, leaving any error it ended with to <see cref="ThrowIfFailed"/>.</summary>
        private void WaitForWriter()
        {
            try
            {
                _task.Wait(CancellationToken.None);
            }
            catch (AggregateException)
            {
            }
        }

        private void ThrowIfFailed()
        {
            if (_task.IsFaulted)
            {
                _task.GetAwaiter().GetResult();
            }
        }
    }

    /// <summary>Reads one group (and checks it), reporting an unexpected read error with the tensor's name.
    /// Format errors (a file truncated since it was opened) already name the file and the tensor.</summary>
    private static LoadedGroup Read(CheckpointSet model, string name, Device device, bool checkFinite)
    {
        LoadedGroup group;
        try
        {
            group = model.Load(name, device, checkFinite);
        }
        catch (Exception e) when (e is not (OperationCanceledException or SafetensorsFormatException or MergeException))
        {
            throw new MergeException(name, $"reading the inputs failed: {e.Message}", e);
        }

        if (checkFinite)
        {
            try
            {
                FiniteCheck.Require(model, group);
            }
            catch
            {
                group.Dispose();
                throw;
            }
        }

        return group;
    }

    private static SafetensorsCheckpoint Open(string path, CheckpointMergeRequest request, List<SafetensorsCheckpoint> opened)
    {
        var c = SafetensorsCheckpoint.Open(path, request.ReadOptions);
        opened.Add(c);
        return c;
    }

    private static void CheckOutput(CheckpointMergeRequest request, string output)
    {
        var parent = Path.GetDirectoryName(output);
        if (parent is null)
        {
            throw new MergeException($"The output '{output}' is a root folder; choose a folder inside it.");
        }

        if (!Directory.Exists(parent))
        {
            throw new MergeException($"The output directory's parent '{parent}' does not exist.");
        }

        if (File.Exists(output))
        {
            throw new MergeException($"The output '{output}' is a file; the output is a directory (and overwriting replaces only a directory).");
        }

        if (!Directory.Exists(output))
        {
            return;
        }

        if (!request.Overwrite)
        {
            throw new MergeException($"The output '{output}' already exists; choose a new directory or allow overwriting (the CLI's --overwrite).");
        }

        // Overwriting removes the old directory: it must not be, or hold, an input, even through a link.
        string realOutput = RealPath(output);
        foreach (var input in request.Experts.Append(request.BaseModel).Append(request.CopyFilesFrom).Append(request.TokenizerFilesFrom)
                     .Where(p => !string.IsNullOrEmpty(p)))
        {
            string real = RealPath(input!);
            if (PathCase.Comparer.Equals(real, realOutput))
            {
                throw new MergeException($"The output '{output}' is one of the inputs; MergeLab never writes over its inputs.");
            }

            if (PathCase.IsInside(real, realOutput))
            {
                throw new MergeException($"The output '{output}' holds the input '{input}'; MergeLab never writes over its inputs.");
            }

            RequireNoLinkInto(input!, real, output, realOutput);
        }

        CheckReplaceable(output);
    }

    /// <summary>An input's files may be links into the output (a checkpoint assembled from an earlier merge's
    /// shards, or a cache of blobs): replacing the output would change that input, so it is refused. An input
    /// that does not exist has no links (it is reported as missing when it is opened): its parent's are not its own.</summary>
    private static void RequireNoLinkInto(string input, string realInput, string output, string realOutput)
    {
        bool isFolder = Directory.Exists(realInput);
        if (!isFolder && !File.Exists(realInput))
        {
            return;
        }

        foreach (var entry in new DirectoryInfo(FolderOf(realInput, isFolder)).EnumerateFileSystemInfos().Where(e => e.LinkTarget is not null))
        {
            string target;
            try
            {
                target = RealPath(entry.FullName);
            }
            catch (IOException e)
            {
                throw new MergeException($"The input '{input}' has the link '{entry.Name}', which cannot be followed ({e.Message}).", e);
            }

            if (PathCase.Comparer.Equals(target, realOutput) || PathCase.IsInside(target, realOutput))
            {
                throw new MergeException($"The input '{input}' has '{entry.Name}' linked into the output '{output}'; MergeLab never writes over its inputs.");
            }
        }
    }

    /// <summary>A separate tokenizer source must hold a tokenizer: the other model's tokenizer files are left
    /// out, so the output would silently have none.</summary>
    private static void CheckTokenizerSource(string source, string folder, string filesFrom)
    {
        if (!Directory.EnumerateFiles(folder).Any(NonWeightFiles.IsTokenizerFile))
        {
            throw new MergeException($"The tokenizer source '{source}' holds no tokenizer files (tokenizer.json, "
                + "tokenizer.model, tokenizer_config.json, vocab.json, …), so the output would have no tokenizer.");
        }

        // The tokenizer's files are copied and the embeddings kept as they are (mergekit's union or resizing
        // is not done), so a tokenizer from a model of more token rows could give ids past the merged
        // embeddings. One of fewer fits (vocab_size counts embedding rows, often padded past the tokenizer).
        if (NonWeightFiles.ConfigVocabSize(folder) is { } theirs && filesFrom.Length > 0
            && NonWeightFiles.ConfigVocabSize(filesFrom) is { } ours && theirs > ours)
        {
            throw new MergeException($"The tokenizer source '{source}' declares vocab_size {theirs} in its config.json, but the "
                + $"model the output's config.json comes from ('{filesFrom}') declares {ours}; the tokenizer is copied and the "
                + "embeddings are not resized, so its token ids could run past them.");
        }
    }

    /// <summary>The folder of a source of non-weight files that the request names (<see cref="Folder"/>); a
    /// path that does not exist is a <see cref="MergeException"/> naming <paramref name="role"/>, since
    /// <see cref="Folder"/> would take its parent: a typo would copy from there, or nothing.</summary>
    private static string SourceFolder(string? path, string role, string hint)
    {
        if (string.IsNullOrEmpty(path))
        {
            return "";
        }

        // Asked of the path as given (an invalid one, e.g. with a NUL, is then "does not exist" too).
        bool folder = Directory.Exists(path);
        if (!folder && !File.Exists(path))
        {
            throw new MergeException($"{role} '{path}' does not exist{hint}.");
        }

        return FolderOf(path, folder);
    }

    /// <summary>The folder of a model path (a folder, or a file in it); empty for none.</summary>
    private static string Folder(string? path)
    {
        if (string.IsNullOrEmpty(path))
        {
            return "";
        }

        return FolderOf(path, Directory.Exists(path));
    }

    /// <summary><paramref name="path"/>'s full path if it is a folder, else its parent's, without a trailing separator.</summary>
    private static string FolderOf(string path, bool isFolder)
    {
        string full = Path.GetFullPath(path);
        return Path.TrimEndingDirectorySeparator(isFolder ? full : Path.GetDirectoryName(full)!);
    }

    /// <summary>The folders a request names for non-weight files, checked (<see cref="SourceFolder"/>):
    /// <paramref name="CopyFrom"/> null when the request names none, <paramref name="TokenizerFrom"/> empty.</summary>
    private readonly record struct FileSources(string? CopyFrom, string TokenizerFrom);

    /// <summary>What file browsers leave in a folder they have shown: not the user's work.</summary>
    private static readonly string[] FolderViewFiles = [".DS_Store", "Thumbs.db", "desktop.ini"];

    /// <summary>An existing output is replaced only when it looks like a merged checkpoint: no subfolders, only
    /// files a merge may write (safetensors weights, their index, and the <c>.json</c>, <c>.txt</c>,
    /// <c>.model</c>, <c>.jinja</c> and <c>.tiktoken</c> files of <see cref="NonWeightFiles.IsNonWeightFile"/>,
    /// which it copies from the source whatever their names), besides a file browser's own files, and weights or
    /// their index among them (or nothing at all). A mistyped OUT_DIR such as the working folder, a project
    /// folder holding the merge's own YAML config, or a home directory is refused instead of deleted.</summary>
    private static void CheckReplaceable(string output)
    {
        var folder = Directory.EnumerateDirectories(output).FirstOrDefault();
        if (folder is not null)
        {
            throw new MergeException($"The output '{output}' holds the folder '{Path.GetFileName(folder)}', so it is not a merged checkpoint; "
                + "overwriting replaces only a folder of checkpoint files. Choose another output or remove it yourself.");
        }

        var files = Directory.EnumerateFiles(output).Select(f => Path.GetFileName(f)!)
            .Where(f => !FolderViewFiles.Contains(f, StringComparer.OrdinalIgnoreCase)).Order(StringComparer.Ordinal).ToArray();
        if (files.FirstOrDefault(f => !IsWeightFile(f) && !NonWeightFiles.IsNonWeightFile(f)) is { } other)
        {
            // A config, notes or code beside old weights: the folder is the user's, not a merge's output.
            throw new MergeException($"The output '{output}' holds '{other}', which a merge does not write, so it is not a merged checkpoint; "
                + "overwriting replaces only a folder of checkpoint files. Choose another output or remove it yourself.");
        }

        if (files.Length > 0 && !files.Any(IsWeightFile))
        {
            throw new MergeException($"The output '{output}' holds no safetensors weights, so it is not a merged checkpoint; "
                + "overwriting replaces only a folder of checkpoint files. Choose another output or remove it yourself.");
        }

        static bool IsWeightFile(string name) =>
            name.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) || name.EndsWith(".safetensors.index.json", StringComparison.OrdinalIgnoreCase);
    }

    /// <summary><paramref name="path"/> made absolute with every symbolic link along it resolved (as far as it exists).</summary>
    private static string RealPath(string path)
    {
        string full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(path));
        string root = Path.GetPathRoot(full)!;
        string current = root;
        foreach (var part in full[root.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries))
        {
            current = Path.Combine(current, part);
            FileSystemInfo info = Directory.Exists(current) ? new DirectoryInfo(current) : new FileInfo(current);
            if (info.Exists && info.LinkTarget is not null && info.ResolveLinkTarget(returnFinalTarget: true) is { } target)
            {
                current = RealPath(target.FullName);
            }
        }

        return current;
    }

    /// <summary>Renames the finished <paramref name="temp"/> to <paramref name="output"/>; with
    /// <paramref name="overwrite"/>, an existing output is first moved aside and deleted only once the new
    /// one is in place, and moved back if that rename fails, so a failure leaves the user's old output under
    /// a hidden name only when moving it back fails too: its own name was taken meanwhile, or the directory
    /// no longer lets it be renamed (<see cref="FindLeftovers"/> reports it). The failed rename's error is
    /// the one thrown.</summary>
    internal static void MoveIntoPlace(string temp, string output, bool overwrite)
    {
        if (overwrite && Directory.Exists(output))
        {
            string old = temp + MovedAsideSuffix;
            Directory.Move(output, old);
            try
            {
                Directory.Move(temp, output);
            }
            catch
            {
                try
                {
                    Directory.Move(old, output);
                }
                catch (Exception restore) when (restore is IOException or UnauthorizedAccessException)
                {
                    // Something took the output's name meanwhile, or access was lost; the old output stays
                    // beside it, under the moved-aside name, rather than being deleted.
                }

                throw;
            }

            TryDelete(old);
        }
        else
        {
            Directory.Move(temp, output);
        }
    }

    private static void TryDelete(string dir)
    {
        try
        {
            if (Directory.Exists(dir))
            {
                Directory.Delete(dir, recursive: true);
            }
        }
        catch (IOException)
        {
            // Best effort: a leftover hidden temp directory is harmless and named as ours.
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
