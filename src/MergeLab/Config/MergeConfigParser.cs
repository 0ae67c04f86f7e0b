using System.Globalization;
using YamlDotNet.Core;
using YamlDotNet.Core.Events;
using YamlDotNet.RepresentationModel;

namespace MergeLab.Config;

/// <summary>
/// Turns YAML into a <see cref="MergeConfig"/> with YamlDotNet's representation model, so every key can
/// be checked and every error can name its line. Scalars are typed as PyYAML (YAML 1.1, which mergekit
/// uses) types them: <c>true/false/yes/no/on/off</c> in any of their three casings are booleans, and
/// <c>null</c>, <c>~</c> or nothing is null; numbers are parsed with the invariant culture (so
/// <c>1e-3</c> is a number, as pydantic makes it in mergekit).
/// </summary>
internal sealed class MergeConfigParser(string? sourcePath, MergeConfigReadOptions options)
{
    /// <summary>The tag prefix of the YAML core schema; <c>!!str</c> is <c>tag:yaml.org,2002:str</c>.</summary>
    private const string CoreTagPrefix = "tag:yaml.org,2002:";

    /// <summary>The core-schema tags a merge config may carry: plain data, nothing that names a type to build.</summary>
    private static readonly HashSet<string> AllowedTags = ["str", "int", "float", "bool", "null", "map", "seq"];

    private static readonly HashSet<string> TrueWords = ["true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"];
    private static readonly HashSet<string> FalseWords = ["false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"];
    private static readonly HashSet<string> NullWords = ["", "~", "null", "Null", "NULL"];

    private static readonly Dictionary<string, string> UnsupportedTopLevel = new(StringComparer.Ordinal)
    {
        ["slices"] = "MergeLab merges whole models: list them under 'models' (mergekit's 'slices' layer ranges are not supported)",
        ["modules"] = "MergeLab merges whole models: list them under 'models' (mergekit's 'modules' are not supported)",
        ["tokenizer"] = "MergeLab copies one model's tokenizer and does not build vocabularies or permute embeddings; use 'tokenizer_source: base' or a model path instead of mergekit's 'tokenizer' section",
        ["chat_template"] = "MergeLab copies the tokenizer files as they are and does not set chat templates",
    };

    private readonly Dictionary<string, int> _lines = new(StringComparer.Ordinal);

    public MergeConfig Parse(string yaml)
    {
        var root = LoadRoot(yaml);
        var keys = ReadKeys(root, null);
        foreach (var (key, _) in keys)
        {
            if (UnsupportedTopLevel.TryGetValue(key, out var why))
            {
                throw Error(key, $"'{key}' is not supported: {why}.");
            }

            if (key is not ("models" or "base_model" or "merge_method" or "parameters" or "dtype" or "out_dtype" or "tokenizer_source"))
            {
                throw Error(key, $"unknown key '{key}'; accepted: models, base_model, merge_method, parameters, dtype, out_dtype, tokenizer_source.");
            }
        }

        string method = keys.TryGetValue("merge_method", out var m) && !IsNull(m)
            ? RequireString(m, "merge_method")
            : throw Error(null, "'merge_method' is required.", Line(root));
        if (!keys.TryGetValue("models", out var modelsNode) || IsNull(modelsNode))
        {
            throw Error(null, "'models' is required: the list of models to merge.", Line(root));
        }

        return new MergeConfig
        {
            MergeMethod = method,
            Models = ReadModels(modelsNode),
            BaseModel = Optional(keys, "base_model", ReadModelPath),
            Parameters = keys.TryGetValue("parameters", out var p) && !IsNull(p) ? ReadParameters(p, "parameters") : new Dictionary<string, ParameterValue>(),
            DType = Optional(keys, "dtype", RequireString),
            OutDType = Optional(keys, "out_dtype", RequireString),
            TokenizerSource = Optional(keys, "tokenizer_source", ReadModelPath),
            SourcePath = sourcePath,
            Lines = _lines,
        };
    }

    /// <summary>The 1-based number of the first line from line <paramref name="from"/> on whose indentation
    /// holds a tab, or null.</summary>
    private static int? FirstTabIndentedLine(string yaml, int from)
    {
        var lines = yaml.Split('\n');
        int start = Math.Clamp(from - 1, 0, lines.Length);
        int index = Array.FindIndex(lines, start, line => line.TakeWhile(c => c is ' ' or '\t').Contains('\t'));
        return index < 0 ? null : index + 1;
    }

    private YamlNode LoadRoot(string yaml)
    {
        if (yaml.Length > options.MaxLength)
        {
            throw Error(null,
                $"the config is {yaml.Length} characters long, above the limit of {options.MaxLength} ({nameof(MergeConfigReadOptions)}.{nameof(MergeConfigReadOptions.MaxLength)}).");
        }

        var stream = new YamlStream();
        try
        {
            // Building the document recurses once per nesting level, so the limits are checked first, on
            // the event stream, which the document is then built from.
            stream.Load(new ReplayParser(CheckLimits(yaml)));
        }
        catch (YamlException e)
        {
            // YamlDotNet reports a repeated key as a YamlException too, with the key's position. A tab in
            // the indentation it reports at the start of the enclosing mapping (line 1 for the top level) or
            // the line before, so the tabbed line is found here, from there on (a tab leading a quoted
            // scalar's continuation line earlier on is allowed).
            int? line = e.Start.Line > 0 ? (int)e.Start.Line : null;
            if (e.Message.Contains("tab", StringComparison.Ordinal) && FirstTabIndentedLine(yaml, line ?? 1) is int tabbed)
            {
                line = tabbed;
            }

            throw new MergeConfigException(sourcePath, line, null, $"invalid YAML: {e.Message}", e);
        }
        catch (Exception e) when (e is InvalidOperationException or ArgumentException)
        {
            // The loader throws an ArgumentException on some malformed input (a mapping entry with an empty
            // key, "- : x"); the scanner's InvalidOperationException is caught in MoveNext, with a line.
            throw new MergeConfigException(sourcePath, null, null, $"invalid YAML ({e.Message}); check brackets, quotes and indentation.", e);
        }

        if (stream.Documents.Count == 0 || IsNull(stream.Documents[0].RootNode))
        {
            throw Error(null, "the config is empty.");
        }

        if (stream.Documents.Count > 1)
        {
            throw Error(null, "the file holds more than one YAML document; a merge config is one mapping.", Line(stream.Documents[1].RootNode));
        }

        var root = stream.Documents[0].RootNode;
        if (root is not YamlMappingNode)
        {
            throw Error(null, "a merge config must be a mapping (models:, merge_method:, …).", Line(root));
        }

        return root;
    }

    /// <summary>
    /// Walks the YAML event stream (no recursion, nothing built) and refuses nesting deeper than
    /// <see cref="MergeConfigReadOptions.MaxDepth"/>, more than <see cref="MergeConfigReadOptions.MaxNodes"/>
    /// nodes counting each alias as the nodes it stands for (an alias bomb), an alias inside the node it
    /// names, and tags other than the core schema's plain-data ones (a config never names a type to build).
    /// </summary>
    /// <returns>The events, for building the document without parsing the text again.</returns>
    private List<ParsingEvent> CheckLimits(string yaml)
    {
        var scanner = new Scanner(new StringReader(yaml));
        var parser = new Parser(scanner);
        var events = new List<ParsingEvent>();
        var anchorSizes = new Dictionary<string, long>(StringComparer.Ordinal);
        // The collections open around the current event: anchor (if any) and the node count at their start.
        var open = new Stack<(string? Anchor, long Start)>();
        long nodes = 0;
        while (MoveNext(parser, scanner))
        {
            var e = parser.Current!;
            events.Add(e);
            int? line = e.Start.Line > 0 ? (int)e.Start.Line : null;
            if (e is NodeEvent node)
            {
                CheckTag(node, line);
            }

            switch (e)
            {
                case AnchorAlias alias:
                    string name = alias.Value.Value;
                    if (open.Any(o => o.Anchor == name))
                    {
                        throw Error(null, $"the alias *{name} refers to the node that contains it; a merge config cannot be recursive.", line);
                    }

                    // An undefined alias is reported by the loader, with its own message.
                    nodes += anchorSizes.GetValueOrDefault(name, 1);
                    break;
                case Scalar scalar:
                    nodes++;
                    if (!scalar.Anchor.IsEmpty)
                    {
                        anchorSizes[scalar.Anchor.Value] = 1;
                    }

                    break;
                case SequenceStart or MappingStart:
                    nodes++;
                    var anchor = ((NodeEvent)e).Anchor;
                    open.Push((anchor.IsEmpty ? null : anchor.Value, nodes - 1));
                    if (open.Count > options.MaxDepth)
                    {
                        throw Error(null,
                            $"the config nests mappings and lists more than {options.MaxDepth} levels deep ({nameof(MergeConfigReadOptions)}.{nameof(MergeConfigReadOptions.MaxDepth)}).", line);
                    }

                    break;
                case SequenceEnd or MappingEnd:
                    var (closed, start) = open.Pop();
                    if (closed is not null)
                    {
                        anchorSizes[closed] = nodes - start;
                    }

                    break;
            }

            if (nodes > options.MaxNodes)
            {
                throw Error(null,
                    $"the config has more than {options.MaxNodes} YAML nodes, counting each alias as the nodes it repeats ({nameof(MergeConfigReadOptions)}.{nameof(MergeConfigReadOptions.MaxNodes)}); " +
                    "an alias bomb or a corrupt file?", line);
            }
        }

        return events;
    }

    /// <summary>The parser's next event; where YamlDotNet's scanner fails with an
    /// <see cref="InvalidOperationException"/> (it does on some malformed input, e.g. a flow mapping left
    /// open before a block), the error names the line the scanner had reached.</summary>
    private bool MoveNext(Parser parser, Scanner scanner)
    {
        try
        {
            return parser.MoveNext();
        }
        catch (InvalidOperationException e)
        {
            int? line = scanner.CurrentPosition.Line > 0 ? (int)scanner.CurrentPosition.Line : null;
            throw new MergeConfigException(sourcePath, line, null,
                "invalid YAML: a bracket or brace opened on or before this line may not be closed, or the indentation is wrong.", e);
        }
    }

    /// <summary>Hands recorded parsing events to the document loader.</summary>
    private sealed class ReplayParser(List<ParsingEvent> events) : IParser
    {
        private int _next;

        public ParsingEvent? Current { get; private set; }

        public bool MoveNext()
        {
            if (_next == events.Count)
            {
                Current = null;
                return false;
            }

            Current = events[_next++];
            return true;
        }
    }

    private void CheckTag(NodeEvent node, int? line)
    {
        if (node.Tag.IsEmpty || node.Tag.IsNonSpecific)
        {
            return;
        }

        string tag = node.Tag.Value;
        if (!tag.StartsWith(CoreTagPrefix, StringComparison.Ordinal) || !AllowedTags.Contains(tag[CoreTagPrefix.Length..]))
        {
            // mergekit reads configs with yaml.safe_load, which refuses such tags too.
            throw Error(null, $"the tag '{tag}' is not supported: a merge config holds plain strings, numbers, booleans, lists and mappings.", line);
        }
    }

    private List<ModelReference> ReadModels(YamlNode node)
    {
        if (node is not YamlSequenceNode list)
        {
            throw Error("models", "'models' must be a list of '- model: path' entries.", Line(node));
        }

        if (list.Children.Count == 0)
        {
            throw Error("models", "'models' is empty; list at least one model.", Line(node));
        }

        var models = new List<ModelReference>();
        for (int i = 0; i < list.Children.Count; i++)
        {
            string path = $"models[{i}]";
            var item = list.Children[i];
            Remember(path, item);
            if (item is not YamlMappingNode)
            {
                throw Error(path, "each entry of 'models' must be a mapping such as '- model: path/to/model'.", Line(item));
            }

            var keys = ReadKeys(item, path);
            foreach (var (key, _) in keys)
            {
                if (key is not ("model" or "parameters"))
                {
                    throw Error($"{path}.{key}", $"unknown key '{key}' in a model entry; accepted: model, parameters.");
                }
            }

            if (!keys.TryGetValue("model", out var modelNode) || IsNull(modelNode))
            {
                throw Error(path, "the entry has no 'model' path.", Line(item));
            }

            var parameters = keys.TryGetValue("parameters", out var p) && !IsNull(p)
                ? ReadParameters(p, $"{path}.parameters")
                : new Dictionary<string, ParameterValue>();
            models.Add(new ModelReference(ReadModelPath(modelNode, $"{path}.model"), parameters) { Line = Line(item) });
        }

        return models;
    }

    /// <summary>A model reference: a path string, or mergekit's <c>{model: path}</c> /
    /// <c>{model: {path: path}}</c> (its <c>ModelReference</c> and <c>ModelPath</c>).</summary>
    private string ReadModelPath(YamlNode node, string path)
    {
        if (node is YamlScalarNode)
        {
            return RequireString(node, path);
        }

        if (node is not YamlMappingNode)
        {
            throw Error(path, "a model must be a path, or a mapping {model: path}.", Line(node));
        }

        var keys = ReadKeys(node, path);
        foreach (var (key, _) in keys)
        {
            if (key is "lora" or "override_architecture")
            {
                throw Error($"{path}.{key}", $"'{key}' is not supported: MergeLab merges local checkpoints as they are; merge adapters into their model first.");
            }

            if (key != "model")
            {
                throw Error($"{path}.{key}", $"unknown key '{key}' in a model reference; write a path, {{model: path}} or {{model: {{path: path}}}}.");
            }
        }

        var inner = keys.TryGetValue("model", out var n) && !IsNull(n) ? n : throw Error(path, "the model reference has no 'model' path.", Line(node));
        if (inner is YamlScalarNode)
        {
            return RequireString(inner, $"{path}.model");
        }

        var innerKeys = inner is YamlMappingNode ? ReadKeys(inner, $"{path}.model") : throw Error($"{path}.model", "expected a path or {path: ...}.", Line(inner));
        foreach (var (key, _) in innerKeys)
        {
            if (key == "revision")
            {
                throw Error($"{path}.model.revision", "'revision' is not supported: MergeLab reads local checkpoints, not Hugging Face hub revisions.");
            }

            if (key != "path")
            {
                throw Error($"{path}.model.{key}", $"unknown key '{key}'; a model path mapping has only 'path'.");
            }
        }

        return innerKeys.TryGetValue("path", out var pathNode) && !IsNull(pathNode)
            ? RequireString(pathNode, $"{path}.model.path")
            : throw Error($"{path}.model", "the mapping has no 'path'.", Line(inner));
    }

    private Dictionary<string, ParameterValue> ReadParameters(YamlNode node, string path)
    {
        if (node is not YamlMappingNode)
        {
            throw Error(path, "'parameters' must be a mapping of parameter names to values.", Line(node));
        }

        var result = new Dictionary<string, ParameterValue>(StringComparer.Ordinal);
        foreach (var (name, value) in ReadKeys(node, path))
        {
            result[name] = ReadValue(value, $"{path}.{name}", allowConditions: true);
        }

        return result;
    }

    /// <summary>mergekit's <c>ParameterSetting</c>: a scalar, a list of numbers (gradient), or a list of
    /// <c>{filter, value}</c> (a single such mapping is taken as a one-entry list).</summary>
    private ParameterValue ReadValue(YamlNode node, string path, bool allowConditions)
    {
        Remember(path, node);
        const string Expected = "expected a number, true/false, a list of numbers (a gradient) or a list of {filter, value}";
        switch (node)
        {
            case YamlScalarNode scalar:
                if (IsNull(scalar))
                {
                    throw Error(path, "the parameter has no value; " + Expected + ".", Line(node));
                }

                if (Boolean(scalar) is bool b)
                {
                    return new BooleanParameter(b) { Line = Line(node) };
                }

                return Number(scalar) is double d
                    ? new NumberParameter(d) { Line = Line(node) }
                    : throw Error(path, $"'{scalar.Value}' is not a finite number or a boolean; {Expected}.", Line(node));

            case YamlSequenceNode list when list.Children.Count == 0:
                throw Error(path, "the list is empty; " + Expected + ".", Line(node));

            case YamlSequenceNode list when list.Children.All(c => c is YamlScalarNode):
                var points = new double[list.Children.Count];
                for (int i = 0; i < points.Length; i++)
                {
                    var item = (YamlScalarNode)list.Children[i];
                    points[i] = Number(item) ?? throw Error($"{path}[{i}]",
                        $"'{item.Value}' is not a finite number; a gradient is a list of numbers.", Line(item));
                }

                return new GradientParameter(points) { Line = Line(node) };

            case YamlSequenceNode list when allowConditions && list.Children.All(c => c is YamlMappingNode):
                var conditions = list.Children.Select((c, i) => ReadCondition(c, $"{path}[{i}]")).ToArray();
                return new ConditionalParameter(conditions) { Line = Line(node) };

            case YamlMappingNode when allowConditions:
                return new ConditionalParameter([ReadCondition(node, path)]) { Line = Line(node) };

            default:
                throw Error(path, allowConditions ? Expected + "." : "a condition's value must be a number, true/false or a list of numbers.", Line(node));
        }
    }

    private ParameterCondition ReadCondition(YamlNode node, string path)
    {
        Remember(path, node);
        var keys = ReadKeys(node, path);
        foreach (var (key, _) in keys)
        {
            if (key is not ("filter" or "value"))
            {
                throw Error($"{path}.{key}", $"unknown key '{key}' in a condition; accepted: filter, value.");
            }
        }

        string? filter = keys.TryGetValue("filter", out var f) && !IsNull(f) ? RequireString(f, $"{path}.filter") : null;
        var value = keys.TryGetValue("value", out var v) && !IsNull(v)
            ? ReadValue(v, $"{path}.value", allowConditions: false)
            : throw Error(path, "the condition has no 'value'.", Line(node));
        return new ParameterCondition(filter, value);
    }

    /// <summary>A mapping's entries by key, in order; keys must be plain strings. A YAML merge key,
    /// <c>&lt;&lt;: *anchor</c> or <c>&lt;&lt;: [*a, *b]</c>, which mergekit's reader (PyYAML's <c>safe_load</c>)
    /// expands, adds the entries of the mappings it names that the mapping does not give itself, the first
    /// named mapping winning among them.</summary>
    private Dictionary<string, YamlNode> ReadKeys(YamlNode node, string? path, int merges = 0)
    {
        var result = new Dictionary<string, YamlNode>(StringComparer.Ordinal);
        YamlNode? merged = null, mergeKey = null;
        foreach (var (keyNode, value) in ((YamlMappingNode)node).Children)
        {
            if (keyNode is YamlScalarNode { Value: "<<", Style: ScalarStyle.Plain or ScalarStyle.Any })
            {
                (merged, mergeKey) = (value, keyNode); // a second one is a duplicate key, which the loader refuses
                continue;
            }

            if (keyNode is not YamlScalarNode { Value: { } key } || IsNull(keyNode))
            {
                throw Error(path, "a key must be a name.", Line(keyNode));
            }

            string keyPath = path is null ? key : $"{path}.{key}";
            if (!result.TryAdd(key, value))
            {
                throw Error(keyPath, $"'{key}' is given twice.", Line(keyNode));
            }

            Remember(keyPath, keyNode);
        }

        if (merged is not null)
        {
            // Errors give the key's line: an alias's node is the anchored one, lines away.
            string mergePath = path is null ? "<<" : $"{path}.<<";
            int? line = Line(mergeKey!);
            IEnumerable<YamlNode> sources = merged switch
            {
                YamlMappingNode mapping => [mapping],
                YamlSequenceNode list when list.Children.All(c => c is YamlMappingNode) => list.Children,
                _ => throw Error(mergePath, "a merge key takes a mapping or a list of mappings, such as *anchor or [*a, *b].", line),
            };
            if (merges >= options.MaxDepth)
            {
                throw Error(mergePath, $"merge keys name mappings that merge others more than {options.MaxDepth} deep "
                    + $"({nameof(MergeConfigReadOptions)}.{nameof(MergeConfigReadOptions.MaxDepth)}).", line);
            }

            foreach (var source in sources)
            {
                foreach (var (key, value) in ReadKeys(source, path, merges + 1))
                {
                    result.TryAdd(key, value);
                }
            }
        }

        return result;
    }

    private static T? Optional<T>(Dictionary<string, YamlNode> keys, string key, Func<YamlNode, string, T> read)
        where T : class =>
        keys.TryGetValue(key, out var node) && !IsNull(node) ? read(node, key) : null;

    private string RequireString(YamlNode node, string path)
    {
        if (node is not YamlScalarNode { Value: { } value } || IsNull(node) || value.Length == 0)
        {
            throw Error(path, "expected a string.", Line(node));
        }

        return value;
    }

    private static bool IsNull(YamlNode node) =>
        node is YamlScalarNode { Style: ScalarStyle.Plain or ScalarStyle.Any } s && NullWords.Contains(s.Value ?? "");

    private static bool? Boolean(YamlScalarNode s)
    {
        if (s.Style is not (ScalarStyle.Plain or ScalarStyle.Any) || s.Value is null)
        {
            return null;
        }

        return TrueWords.Contains(s.Value) ? true : FalseWords.Contains(s.Value) ? false : null;
    }

    private static double? Number(YamlScalarNode s) =>
        s.Value is { } text
        && double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double d)
        && double.IsFinite(d) ? d : null;

    private void Remember(string path, YamlNode node)
    {
        if (Line(node) is int line)
        {
            _lines.TryAdd(path, line);
        }
    }

    private static int? Line(YamlNode node) => node.Start.Line > 0 ? (int)node.Start.Line : null;

    private MergeConfigException Error(string? keyPath, string problem, int? line = null) =>
        new(sourcePath, line ?? (keyPath is not null && _lines.TryGetValue(keyPath, out int l) ? l : null), keyPath, problem);
}
