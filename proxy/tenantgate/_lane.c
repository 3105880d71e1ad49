/* tenantgate._lane: the steady-state lane, the per-statement path in C.

   Owns one session's steady state: the requests it takes, each a whole client
   chunk, checked and forwarded here, and their answers when each arrives as one
   exact chunk.  The requests:

   - [Parse +] Bind (unnamed portal) [+ Describe portal] + Execute + Sync, whose
     Bind is of a named statement the Python inspector taught it, or whose Parse is
     the unnamed statement's, byte for byte the one the server holds (taught
     likewise), and whose tenant parameters are this tenant's bytes in text format.
     Its answer: [ParseComplete +] BindComplete [+ RowDescription or NoData] +
     DataRow* + CommandComplete + ReadyForQuery.
   - A simple Query known by its bytes (the analysis cache's known_messages, as
     PolicyInspector.known_query looks it up, once the inspector said so:
     learn_queries), in enforce mode only.
   - A simple Query of a text shape the inspector taught it (learn_shapes: a text
     with new literals inlined, as PolicyInspector._unparsed_query finds it by its
     digit key; always one plain SELECT, INSERT, UPDATE or DELETE).
   - A transaction-control statement (BEGIN, COMMIT, ...), as a Query known by its
     bytes (the cache's known_controls) or as a bound statement, in every mode.
   A Query's answer: [RowDescription +] DataRow* + CommandComplete + ReadyForQuery.

   Where (the session says which: in_block, splice):
   - enforce mode: whenever the server is idle, in a transaction block or not;
   - rls/both mode, in a block that has the tenant: as in enforce mode, but no
     Query known by its bytes other than transaction control;
   - rls/both mode elsewhere (``splice``): only transaction control (nothing goes
     before it), and text shapes with the injector's set_config prefix in front, as
     _injected_query sends them; their answer then starts with set_config's one
     row (RowDescription, DataRow, CommandComplete), which the lane drops as the
     tracker would (hidden_statements).
   In a block only statements that are plain (neither transaction control nor
   DEALLOCATE ALL: the inspector says) or transaction control pass, so that
   nothing else the rls/both injector tracks changes.  An answer ends in the status
   the request was sent in ('I', or 'T' in a block), except transaction control's,
   which may end in either; upstream() returns it, and the session's tracker and
   (rls/both) injector follow it as the Python path would.

   The per-statement metrics (count, duration bucket, rows, bytes) are tallied
   here and taken by the session's metrics when they flush.

   The Python session stays the single reference.  The lane knows only what the
   inspector taught it (PolicyInspector.known_bind's _BindLane decisions, and from
   parse_resolved the unnamed statement's known Parse), forgets all of it at every
   change of the inspector's statement registry, and records the unnamed portal in
   the inspector's own portal map as known_bind does.
   Anything else is not its case: it returns False and the session goes the
   Python way, after the lane has handed over the request it forwarded (if any)
   as the tracker entry the Python path would have made (`materialize`, or
   `materialize_query` with whether it was spliced).  See
   docs/architecture.md ("The lane") and tests/unit/test_lane.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define MAX_STATEMENTS 16 /* statements taught; the table is emptied when full */
#define MAX_PARSES 16     /* unnamed-statement Parses taught; emptied when full */
#define MAX_NAME 63       /* longer statement names go the Python way */
#define MAX_NUMBERS 8     /* tenant parameters per statement */
#define MAX_COMMANDS 6    /* metric labels (select, insert, update, delete, other, ...) */
#define MAX_BOUNDS 16     /* duration histogram bounds (metrics.DURATION_BUCKETS: 15) */
#define MAX_ROW_DIGITS 18 /* a longer row count goes the Python way (no overflow) */

/* A text shape's checks (textshapes.LANE_*): triples of uint32 (check, start, end). */
enum { CHECK_DIGIT, CHECK_INT4, CHECK_NUMERIC, CHECK_TENANT };
#define CHECK_SIZE 12

/* What client() took (module constants TOOK_CONTROL and TOOK_SPLICED; True: TOOK). */
enum { TOOK = 1, TOOK_CONTROL = 2, TOOK_SPLICED = 3 };
#define INT4_DIGITS 10 /* len(str(2**31 - 1)) */

/* Execute (unnamed portal, no row limit) + Sync; Describe portal "" before them. */
static const unsigned char EXECUTE_SYNC[15] = {'E', 0, 0, 0, 9, 0, 0, 0, 0, 0, 'S', 0, 0, 0, 4};
static const unsigned char DESCRIBE_EXECUTE_SYNC[22] = {'D', 0, 0, 0, 6, 'P', 0, 'E', 0, 0, 0,
                                                        9,   0, 0, 0, 0, 0, 'S', 0, 0, 0, 4};

typedef struct {
    PyObject *command; /* the metric label (str); NULL: slot free */
    long long allowed;
    long long buckets[MAX_BOUNDS + 1]; /* observations per bucket, not cumulative */
    double seconds;
} Tally;

typedef struct {
    PyObject *info; /* the PortalInfo known_bind records; NULL: slot free */
    int tally;
    int plain; /* neither transaction control nor DEALLOCATE ALL: may pass in a block */
    int control; /* transaction control: may pass anywhere, its answer changes the status */
    int name_length;
    int count;
    uint16_t numbers[MAX_NUMBERS]; /* tenant parameters ($n), ascending */
    char name[MAX_NAME + 1];
} Statement;

typedef struct {
    PyObject *payload;  /* the Parse's bytes after its length */
    PyObject *prepared; /* the inspector's Prepared of it (None: not given) */
    Statement statement;
} KnownParse;

typedef struct {
    PyObject_HEAD
    PyObject *upstream_write, *client_write, *materialize, *tenant, *portals, *mark;
    /* Simple Queries: the hand-over of one (NULL: the lane takes none), and, while
       the inspector's registry is as when it said so (learn_queries), the known
       messages, the tenant's constants and the cache whose hits they count. */
    PyObject *materialize_query, *queries, *tenant_only, *query_cache;
    int known_queries; /* whether it may take Queries by their bytes (enforce mode) */
    /* The known messages that are one transaction-control statement (in every
       mode: the server's answer may change the transaction status), while the
       registry is as when the inspector said so (learn_queries). */
    PyObject *controls;
    /* rls/both mode: what the injector puts in front of a Query that needs the
       tenant (TenantInjector.query_prefix); NULL: enforce mode, nothing. */
    PyObject *splice;
    /* Text shapes, while the registry is as when the inspector said so
       (learn_shapes): the tenant's string literal (tenant_literal) + a digit key ->
       (checks, command, analysis); and the analysis cache's file_shaped. */
    PyObject *shapes, *file_shaped, *tenant_literal;
    /* The unnamed statement's Parses taught (learn_parse), each with its statement
       and the inspector's Prepared; the analysis cache whose hits a known Parse
       counts; the inspector's known Parses (payload -> Prepared: an entry passes
       only while that still maps its payload to its Prepared) and what confirms
       one as the unnamed statement (PolicyInspector.lane_parsed), both NULL for a
       lane that only ever takes the Parse the server holds; and the Prepared the
       server holds as the unnamed statement as far as the lane knows (NULL: it
       does not know, since the registry changed). */
    KnownParse parses[MAX_PARSES];
    int parse_count;
    PyObject *cache, *known_parses, *confirm, *unnamed;
    Py_ssize_t max_message, max_portals;
    int released;
    int statement_count;
    Statement statements[MAX_STATEMENTS];
    int bound_count;
    double bounds[MAX_BOUNDS];
    Tally tallies[MAX_COMMANDS];
    /* The request forwarded here, its answer still due. */
    int outstanding, describe, current_tally;
    unsigned char status; /* the ReadyForQuery status its answer must end with */
    int control; /* transaction control: its answer may end with either status */
    int spliced; /* sent with the splice in front: its result is hidden */
    PyObject *current_info, *current_parse; /* current_parse: its Parse payload, or NULL */
    PyObject *current_prepared;             /* and that Parse's Prepared */
    PyObject *current_sql, *current_command; /* a Query's (current_info NULL) */
    double started;
    /* Since the last take(). */
    long long bytes_in, bytes_out, rows;
    int dirty;
    long long served; /* statements answered here, for tests and diagnostics */
} Lane;

static PyObject *EMPTY_NAME; /* "": the unnamed portal's key in the portal map */
static PyObject *HITS;       /* "hits": AnalysisCache.hits */
static PyObject *ONE;
static PyObject *STATUS_IDLE, *STATUS_IN_BLOCK; /* "I", "T": what upstream() returns */

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

/* time.perf_counter()'s clock on Linux, in seconds. */
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void forget_named(Lane *self) {
    for (int i = 0; i < self->statement_count; i++) {
        Py_CLEAR(self->statements[i].info);
    }
    self->statement_count = 0;
}

static void forget_queries(Lane *self) {
    Py_CLEAR(self->queries);
    Py_CLEAR(self->controls);
    Py_CLEAR(self->tenant_only);
    Py_CLEAR(self->query_cache);
    Py_CLEAR(self->shapes);
    Py_CLEAR(self->file_shaped);
}

static void forget_parses(Lane *self) {
    for (int i = 0; i < self->parse_count; i++) {
        Py_CLEAR(self->parses[i].payload);
        Py_CLEAR(self->parses[i].prepared);
        Py_CLEAR(self->parses[i].statement.info);
    }
    self->parse_count = 0;
    Py_CLEAR(self->unnamed);
}

/* What a change of the registry makes untrue.  The Parses taught stay: each is
   checked against the inspector's known Parses when it comes, and taking one
   confirms it as the unnamed statement (lane_parsed).  A lane without the
   inspector's known Parses knows only the Parse the server holds, which a change
   may drop. */
static void forget_registry(Lane *self) {
    forget_named(self);
    forget_queries(self);
    if (self->known_parses == NULL) {
        forget_parses(self);
    }
    Py_CLEAR(self->unnamed);
}

static void forget_statements(Lane *self) {
    forget_named(self);
    forget_queries(self);
    forget_parses(self);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->known_parses);
    Py_CLEAR(self->confirm);
}

static int Lane_traverse(Lane *self, visitproc visit, void *arg) {
    Py_VISIT(self->upstream_write);
    Py_VISIT(self->client_write);
    Py_VISIT(self->materialize);
    Py_VISIT(self->tenant);
    Py_VISIT(self->portals);
    Py_VISIT(self->mark);
    Py_VISIT(self->current_info);
    Py_VISIT(self->current_parse);
    Py_VISIT(self->current_sql);
    Py_VISIT(self->current_command);
    Py_VISIT(self->materialize_query);
    Py_VISIT(self->queries);
    Py_VISIT(self->controls);
    Py_VISIT(self->splice);
    Py_VISIT(self->tenant_only);
    Py_VISIT(self->query_cache);
    Py_VISIT(self->shapes);
    Py_VISIT(self->file_shaped);
    Py_VISIT(self->tenant_literal);
    for (int i = 0; i < self->parse_count; i++) {
        Py_VISIT(self->parses[i].payload);
        Py_VISIT(self->parses[i].prepared);
        Py_VISIT(self->parses[i].statement.info);
    }
    Py_VISIT(self->unnamed);
    Py_VISIT(self->current_prepared);
    Py_VISIT(self->known_parses);
    Py_VISIT(self->confirm);
    Py_VISIT(self->cache);
    for (int i = 0; i < self->statement_count; i++) {
        Py_VISIT(self->statements[i].info);
    }
    for (int i = 0; i < MAX_COMMANDS; i++) {
        Py_VISIT(self->tallies[i].command);
    }
    return 0;
}

static int Lane_clear(Lane *self) {
    Py_CLEAR(self->upstream_write);
    Py_CLEAR(self->client_write);
    Py_CLEAR(self->materialize);
    Py_CLEAR(self->portals);
    Py_CLEAR(self->mark);
    Py_CLEAR(self->current_info);
    Py_CLEAR(self->current_parse);
    Py_CLEAR(self->current_prepared);
    Py_CLEAR(self->current_sql);
    Py_CLEAR(self->current_command);
    Py_CLEAR(self->materialize_query);
    forget_statements(self);
    self->outstanding = 0;
    self->released = 1;
    return 0;
}

static void Lane_dealloc(Lane *self) {
    PyObject_GC_UnTrack(self);
    Lane_clear(self);
    Py_CLEAR(self->tenant);
    Py_CLEAR(self->tenant_literal);
    Py_CLEAR(self->splice);
    for (int i = 0; i < MAX_COMMANDS; i++) {
        Py_CLEAR(self->tallies[i].command);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Lane_init(Lane *self, PyObject *args, PyObject *kwds) {
    PyObject *upstream_write, *client_write, *materialize, *tenant, *materialize_query = Py_None;
    PyObject *splice = Py_None;
    Py_ssize_t max_message;
    int known_queries = 0;
    static char *kwlist[] = {"upstream_write", "client_write",      "materialize",
                             "tenant",         "max_message",       "materialize_query",
                             "known_queries",  "splice",            NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO!n|OpO", kwlist, &upstream_write,
                                     &client_write, &materialize, &PyBytes_Type, &tenant,
                                     &max_message, &materialize_query, &known_queries,
                                     &splice)) {
        return -1;
    }
    if (splice != Py_None && (!PyBytes_CheckExact(splice) || PyBytes_GET_SIZE(splice) == 0)) {
        PyErr_SetString(PyExc_TypeError, "splice must be non-empty bytes or None");
        return -1;
    }
    if (self->tenant != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Lane is initialised once");
        return -1;
    }
    Py_ssize_t tenant_length = PyBytes_GET_SIZE(tenant);
    self->tenant_literal = PyBytes_FromStringAndSize(NULL, tenant_length + 2);
    if (self->tenant_literal == NULL) {
        return -1;
    }
    char *literal = PyBytes_AS_STRING(self->tenant_literal);
    literal[0] = literal[tenant_length + 1] = '\'';
    memcpy(literal + 1, PyBytes_AS_STRING(tenant), (size_t)tenant_length);
    self->known_queries = known_queries;
    Py_INCREF(upstream_write);
    Py_INCREF(client_write);
    Py_INCREF(materialize);
    Py_INCREF(tenant);
    self->upstream_write = upstream_write;
    self->client_write = client_write;
    self->materialize = materialize;
    self->tenant = tenant;
    self->max_message = max_message;
    if (materialize_query != Py_None) {
        Py_INCREF(materialize_query);
        self->materialize_query = materialize_query;
    }
    if (splice != Py_None) {
        Py_INCREF(splice);
        self->splice = splice;
    }
    return 0;
}

/* The lane's request, handed to the session as the tracker entry it would have made. */
static int hand_over(Lane *self) {
    if (!self->outstanding) {
        return 0;
    }
    self->outstanding = 0;
    PyObject *result;
    if (self->current_info == NULL) { /* a Query */
        PyObject *sql = self->current_sql, *command = self->current_command;
        self->current_sql = self->current_command = NULL;
        result = PyObject_CallFunction(self->materialize_query, "OOdO", sql, command,
                                       self->started, self->spliced ? Py_True : Py_False);
        Py_DECREF(sql);
        Py_DECREF(command);
    } else {
        PyObject *info = self->current_info, *parse = self->current_parse;
        self->current_info = self->current_parse = NULL;
        Py_CLEAR(self->current_prepared);
        result = PyObject_CallFunction(self->materialize, "OOdO", info,
                                       self->describe ? Py_True : Py_False, self->started,
                                       parse == NULL ? Py_None : parse);
        Py_DECREF(info);
        Py_XDECREF(parse);
    }
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

static int note_dirty(Lane *self) {
    if (self->dirty) {
        return 0;
    }
    self->dirty = 1;
    if (self->mark == NULL) {
        return 0;
    }
    PyObject *result = PyObject_CallNoArgs(self->mark);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* The tallies marked dirty, ``data`` passed on with ``write``: 0, or -1. */
static int pass_on(Lane *self, PyObject *write, PyObject *data) {
    if (note_dirty(self) < 0) {
        return -1;
    }
    PyObject *result = PyObject_CallOneArg(write, data);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* What client() returns for a request it forwarded (its kind), or NULL. */
static PyObject *took(int failed, int kind) {
    if (failed) {
        return NULL;
    }
    return kind == TOOK ? Py_NewRef(Py_True) : PyLong_FromLong(kind);
}

static Statement *find_statement(Lane *self, const unsigned char *name, Py_ssize_t length) {
    for (int i = 0; i < self->statement_count; i++) {
        Statement *statement = &self->statements[i];
        if (statement->name_length == length && memcmp(statement->name, name, length) == 0) {
            return statement;
        }
    }
    return NULL;
}

/* frontend.bind_params_at(payload, pos, numbers) followed by enforcement._all_text:
   the Bind's rest is exactly what Bind.decode accepts and every tenant parameter is
   present, in text format and this tenant's bytes. */
static int tenant_params_match(Lane *self, const Statement *statement,
                               const unsigned char *payload, Py_ssize_t size, Py_ssize_t pos) {
    const unsigned char *tenant = (const unsigned char *)PyBytes_AS_STRING(self->tenant);
    Py_ssize_t tenant_length = PyBytes_GET_SIZE(self->tenant);
    int found = 0;
    if (size - pos < 2) {
        return 0;
    }
    unsigned format_count = be16(payload + pos);
    Py_ssize_t formats_at = pos + 2;
    pos = formats_at + 2 * (Py_ssize_t)format_count;
    if (pos < 0 || size - pos < 2) {
        return 0;
    }
    unsigned count = be16(payload + pos);
    pos += 2;
    for (unsigned index = 0; index < count; index++) {
        if (size - pos < 4) {
            return 0;
        }
        int32_t length = (int32_t)be32(payload + pos);
        pos += 4;
        if (length < -1 || (length > 0 && length > size - pos)) {
            return 0;
        }
        if (found < statement->count && statement->numbers[found] == index + 1) {
            unsigned code;
            if (format_count == 1) {
                code = be16(payload + formats_at);
            } else if (index < format_count) {
                code = be16(payload + formats_at + 2 * (Py_ssize_t)index);
            } else {
                code = 0;
            }
            if (code == 1 || length != tenant_length ||
                memcmp(payload + pos, tenant, (size_t)tenant_length) != 0) {
                return 0;
            }
            found++;
        }
        if (length > 0) {
            pos += length;
        }
    }
    if (size - pos < 2) {
        return 0;
    }
    pos += 2 + 2 * (Py_ssize_t)be16(payload + pos); /* the result-format codes */
    return pos == size && found == statement->count;
}

static int count_hit(PyObject *cache);
static int find_tally(Lane *self, PyObject *command);

/* The Query message ``data`` with ``prefix`` in front of its text (what
   Session._injected_query frames for a one-statement Query that needs the tenant). */
static PyObject *spliced_query(PyObject *prefix, PyObject *data) {
    Py_ssize_t extra = PyBytes_GET_SIZE(prefix), size = PyBytes_GET_SIZE(data);
    if (size - 1 + extra > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "the spliced Query is too long");
        return NULL;
    }
    PyObject *message = PyBytes_FromStringAndSize(NULL, size + extra);
    if (message == NULL) {
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(message);
    uint32_t length = (uint32_t)(size - 1 + extra);
    out[0] = 'Q';
    out[1] = (unsigned char)(length >> 24);
    out[2] = (unsigned char)(length >> 16);
    out[3] = (unsigned char)(length >> 8);
    out[4] = (unsigned char)length;
    memcpy(out + 5, PyBytes_AS_STRING(prefix), (size_t)extra);
    memcpy(out + 5 + extra, PyBytes_AS_STRING(data) + 5, (size_t)(size - 5));
    return message;
}

/* The Query ``data``, allowed with the metric label ``command`` (tally ``index``)
   and text ``sql`` (both references taken over), sent, as it is or (``splice``)
   with the injector's prefix in front: what client() returns, or NULL. */
static PyObject *send_query(Lane *self, PyObject *data, PyObject *sql, PyObject *command,
                            int index, int in_block, int control, int splice) {
    PyObject *message = data;
    if (splice) {
        message = spliced_query(self->splice, data);
        if (message == NULL) {
            Py_DECREF(sql);
            Py_DECREF(command);
            return NULL;
        }
    }
    self->current_sql = sql;
    self->current_command = command;
    self->current_tally = index;
    self->describe = 0;
    self->status = in_block ? 'T' : 'I';
    self->control = control;
    self->spliced = splice;
    self->outstanding = 1;
    self->started = now();
    self->bytes_in += PyBytes_GET_SIZE(data);
    int failed = pass_on(self, self->upstream_write, message) < 0;
    if (splice) {
        Py_DECREF(message);
    }
    return took(failed, control ? TOOK_CONTROL : splice ? TOOK_SPLICED : TOOK);
}

/* PolicyInspector.known_query's verdict by the bytes, in enforce mode: ``found``
   (known_messages' entry for the whole chunk ``data``) is a Query message it
   allowed before, and its tenant constants, if any, are this tenant's; the hit
   counted, the Query forwarded.  In every mode for a ``control`` one (found in the
   transaction-control messages: nothing to inject before it). */
static PyObject *known_query(Lane *self, PyObject *data, PyObject *found, int in_block,
                             int control) {
    if (!PyTuple_CheckExact(found) || PyTuple_GET_SIZE(found) != 4) {
        Py_RETURN_FALSE;
    }
    PyObject *sql = PyTuple_GET_ITEM(found, 0), *command = PyTuple_GET_ITEM(found, 2);
    PyObject *constants = PyTuple_GET_ITEM(found, 3);
    if (!PyUnicode_CheckExact(command) || !PyFrozenSet_CheckExact(constants)) {
        Py_RETURN_FALSE;
    }
    /* Held before count_hit, which calls into Python: ``found`` is only borrowed. */
    Py_INCREF(sql);
    Py_INCREF(command);
    int fits = 1;
    if (PySet_GET_SIZE(constants) > 0) { /* not only this tenant's: the Python way */
        fits = PyObject_RichCompareBool(constants, self->tenant_only, Py_EQ);
    }
    int index = fits > 0 ? find_tally(self, command) : -1;
    if (fits < 0 || index == -2 || (index >= 0 && count_hit(self->query_cache) < 0)) {
        Py_DECREF(sql);
        Py_DECREF(command);
        return NULL;
    }
    if (index < 0) {
        Py_DECREF(sql);
        Py_DECREF(command);
        Py_RETURN_FALSE;
    }
    return send_query(self, data, sql, command, index, in_block, control, 0);
}

/* textshapes._fits_int4 of the integer literal [start, end) (a minus, digits). */
static int fits_int4(const unsigned char *text, Py_ssize_t start, Py_ssize_t end) {
    start += start < end && text[start] == '-';
    if (start >= end) {
        return -1;
    }
    for (Py_ssize_t i = start; i < end; i++) {
        if (text[i] < '0' || text[i] > '9') {
            return -1;
        }
    }
    while (end - start > INT4_DIGITS - 1 && text[start] == '0') {
        start++;
    }
    Py_ssize_t digits = end - start;
    return digits < INT4_DIGITS ||
           (digits == INT4_DIGITS && memcmp(text + start, "2147483647", INT4_DIGITS) <= 0);
}

/* Whether the Query text [text, text + length) passes a text shape's ``checks``
   (TextShapes.lane_program): the same text key and this tenant's literals. */
static int shape_fits(Lane *self, const unsigned char *text, Py_ssize_t length,
                      PyObject *checks) {
    const unsigned char *check_at = (const unsigned char *)PyBytes_AS_STRING(checks);
    Py_ssize_t size = PyBytes_GET_SIZE(checks);
    const char *literal = PyBytes_AS_STRING(self->tenant_literal);
    Py_ssize_t literal_length = PyBytes_GET_SIZE(self->tenant_literal);
    if (size % CHECK_SIZE) {
        return 0;
    }
    for (Py_ssize_t at = 0; at < size; at += CHECK_SIZE) {
        uint32_t check, start, end;
        memcpy(&check, check_at + at, 4);
        memcpy(&start, check_at + at + 4, 4);
        memcpy(&end, check_at + at + 8, 4);
        if (start >= (uint64_t)length) {
            return 0;
        }
        switch (check) {
        case CHECK_DIGIT:
            if (text[start] != end) {
                return 0;
            }
            break;
        case CHECK_INT4:
        case CHECK_NUMERIC:
            if (end > (uint64_t)length || fits_int4(text, start, end) != (check == CHECK_INT4)) {
                return 0;
            }
            break;
        case CHECK_TENANT:
            if (end > (uint64_t)length || end - start != (uint64_t)literal_length ||
                memcmp(text + start, literal, (size_t)literal_length) != 0) {
                return 0;
            }
            break;
        default:
            return 0;
        }
    }
    return 1;
}

/* PolicyInspector._unparsed_query's verdict for a text its text shape answers, by
   the digit key (TextShapes.lookup_bytes): ``data`` (the whole chunk) is one Query
   message whose digit key the inspector taught with the checks its text passes, so
   it has the taught text's analysis and verdict; the cache counts and files it
   (file_shaped, which declines a text it holds or a message known by its bytes:
   the Python way counts those as hits), and the Query is forwarded (``splice``:
   with the injector's prefix in front, as _injected_query sends it). */
static PyObject *shape_query(Lane *self, PyObject *data, int in_block, int splice) {
    const unsigned char *chunk = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size < 6 || be32(chunk + 1) != (uint32_t)(size - 1) || chunk[size - 1] != 0) {
        Py_RETURN_FALSE;
    }
    const unsigned char *text = chunk + 5;
    Py_ssize_t length = size - 6;
    Py_ssize_t literal_length = PyBytes_GET_SIZE(self->tenant_literal);
    PyObject *digits = PyBytes_FromStringAndSize(NULL, literal_length + length);
    if (digits == NULL) {
        return NULL;
    }
    unsigned char *key = (unsigned char *)PyBytes_AS_STRING(digits);
    memcpy(key, PyBytes_AS_STRING(self->tenant_literal), (size_t)literal_length);
    key += literal_length;
    for (Py_ssize_t i = 0; i < length; i++) {
        key[i] = text[i] >= '1' && text[i] <= '9' ? '0' : text[i];
    }
    PyObject *route = PyDict_GetItemWithError(self->shapes, digits);
    Py_DECREF(digits);
    if (route == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    if (!PyTuple_CheckExact(route) || PyTuple_GET_SIZE(route) != 3) {
        Py_RETURN_FALSE;
    }
    PyObject *checks = PyTuple_GET_ITEM(route, 0), *command = PyTuple_GET_ITEM(route, 1);
    PyObject *analysis = PyTuple_GET_ITEM(route, 2);
    if (!PyBytes_CheckExact(checks) || !PyUnicode_CheckExact(command) ||
        !shape_fits(self, text, length, checks)) {
        Py_RETURN_FALSE;
    }
    int index = find_tally(self, command);
    if (index < 0) {
        return index == -2 ? NULL : Py_NewRef(Py_False);
    }
    PyObject *sql = PyUnicode_DecodeASCII((const char *)text, length, NULL);
    if (sql == NULL) { /* cannot be: the digit key is an ASCII text's */
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    /* The route is only borrowed from the dict: hold what outlives the call. */
    Py_INCREF(command);
    Py_INCREF(analysis);
    PyObject *filed = PyObject_CallFunctionObjArgs(self->file_shaped, sql, data, analysis, NULL);
    Py_DECREF(analysis);
    int took = filed == NULL ? -1 : PyObject_IsTrue(filed);
    Py_XDECREF(filed);
    if (took <= 0) {
        Py_DECREF(sql);
        Py_DECREF(command);
        return took < 0 ? NULL : Py_NewRef(Py_False);
    }
    return send_query(self, data, sql, command, index, in_block, 0, splice);
}

/* known_query's entry for ``data`` in ``table`` (borrowed), or NULL (an error set, or
   not there). */
static PyObject *known_entry(PyObject *table, PyObject *data) {
    return table == NULL ? NULL : PyDict_GetItemWithError(table, data);
}

/* A chunk that starts with a Query: transaction control known by its bytes, known
   by its bytes (enforce mode), or of a text shape taught; False: none of them (or a
   long one: the Python path reports it).  ``splice``: the Query needs the tenant
   (rls/both mode, outside a block that has it), so only transaction control (which
   gets nothing) and text shapes (which get the splice) may pass. */
static PyObject *query_client(Lane *self, PyObject *data, int in_block, int splice) {
    if (PyBytes_GET_SIZE(data) - 5 > self->max_message) {
        Py_RETURN_FALSE;
    }
    PyObject *found = known_entry(self->controls, data);
    if (found != NULL) {
        return known_query(self, data, found, in_block, 1);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (!splice) {
        found = known_entry(self->queries, data);
        if (found != NULL) {
            return known_query(self, data, found, in_block, 0);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    if (self->shapes == NULL || (splice && self->splice == NULL)) {
        Py_RETURN_FALSE;
    }
    return shape_query(self, data, in_block, splice);
}

/* The Parse taught whose payload is [payload, payload + length) (at most one: a
   payload taught again replaces its entry), or NULL. */
static KnownParse *parse_of(Lane *self, const char *payload, Py_ssize_t length) {
    for (int i = 0; i < self->parse_count; i++) {
        KnownParse *parse = &self->parses[i];
        if (PyBytes_GET_SIZE(parse->payload) == length &&
            memcmp(PyBytes_AS_STRING(parse->payload), payload, (size_t)length) == 0) {
            return parse;
        }
    }
    return NULL;
}

/* The Parse taught whose payload is [payload, payload + length), into ``found``, if
   the inspector still knows that payload as that Prepared (known_parse would
   register it): 1; 0: none; -1: an error. */
static int find_parse(Lane *self, const unsigned char *payload, Py_ssize_t length,
                      KnownParse **found) {
    KnownParse *parse = parse_of(self, (const char *)payload, length);
    if (parse == NULL) {
        return 0;
    }
    if (self->known_parses != NULL) {
        PyObject *known = PyDict_GetItemWithError(self->known_parses, parse->payload);
        if (known != parse->prepared) {
            return known == NULL && PyErr_Occurred() ? -1 : 0;
        }
    }
    *found = parse;
    return 1;
}

PyDoc_STRVAR(client_doc,
             "client(data, in_block, splice=False) -> int\n\n"
             "Check and forward a client chunk that is the lane's case, sent while the server\n"
             "is idle outside a transaction block (``in_block`` false) or inside one (true:\n"
             "plain statements and transaction control only).  ``splice`` (rls/both mode,\n"
             "outside a block that has the tenant): only transaction control, and text\n"
             "shapes with the injector's prefix in front.  True: forwarded; TOOK_CONTROL:\n"
             "transaction control forwarded; TOOK_SPLICED: forwarded with the prefix;\n"
             "False: not its case (the request the lane forwarded before, if any, is handed\n"
             "over first).");

static PyObject *Lane_client(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "client(data, in_block[, splice]) takes 2 or 3 arguments");
        return NULL;
    }
    PyObject *data = args[0];
    int in_block = PyObject_IsTrue(args[1]);
    int splice = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (in_block < 0 || splice < 0) {
        return NULL;
    }
    if (self->outstanding) {
        if (hand_over(self) < 0) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    if (self->portals == NULL || !PyBytes_CheckExact(data)) {
        Py_RETURN_FALSE;
    }
    const unsigned char *chunk = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size >= 1 && chunk[0] == 'Q') {
        return query_client(self, data, in_block, splice);
    }
    Py_ssize_t bind_at = 0;
    int with_parse = 0;
    KnownParse *parse = NULL;
    if (size >= 5 && chunk[0] == 'P') {
        /* An unnamed statement's Parse, exactly one taught (known_parse). */
        Py_ssize_t parse_length = (Py_ssize_t)be32(chunk + 1);
        if (parse_length < 4 || size - 6 < parse_length) {
            Py_RETURN_FALSE;
        }
        int found = find_parse(self, chunk + 5, parse_length - 4, &parse);
        if (found <= 0) {
            return found < 0 ? NULL : Py_NewRef(Py_False);
        }
        bind_at = 1 + parse_length;
        with_parse = 1;
    } else if (self->statement_count == 0) {
        Py_RETURN_FALSE;
    }
    if (size - bind_at < 5 || chunk[bind_at] != 'B') {
        Py_RETURN_FALSE;
    }
    Py_ssize_t length = (Py_ssize_t)be32(chunk + bind_at + 1);
    if (length < 5 || length - 4 > self->max_message || size - bind_at - 1 < length) {
        Py_RETURN_FALSE; /* an empty Bind or a long one: the Python path reports it */
    }
    Py_ssize_t end = bind_at + 1 + length, tail = size - end;
    int describe;
    if (tail == 15 && memcmp(chunk + end, EXECUTE_SYNC, 15) == 0) {
        describe = 0;
    } else if (tail == 22 && memcmp(chunk + end, DESCRIBE_EXECUTE_SYNC, 22) == 0) {
        describe = 1;
    } else {
        Py_RETURN_FALSE;
    }
    const unsigned char *payload = chunk + bind_at + 5;
    Py_ssize_t payload_size = length - 4;
    if (payload[0] != 0) {
        Py_RETURN_FALSE; /* a named portal */
    }
    const unsigned char *name_end = memchr(payload + 1, 0, (size_t)(payload_size - 1));
    if (name_end == NULL) {
        Py_RETURN_FALSE;
    }
    Statement *statement;
    if (with_parse) {
        statement = name_end == payload + 1 ? &parse->statement : NULL;
    } else {
        statement = find_statement(self, payload + 1, name_end - (payload + 1));
    }
    /* Transaction control anywhere (nothing goes before it); with ``splice`` nothing
       else (an Execute that needs the tenant: the Python way injects it); in a block
       nothing else that is not plain (DEALLOCATE ALL). */
    if (statement == NULL ||
        (!statement->control && (splice || (in_block && !statement->plain))) ||
        !tenant_params_match(self, statement, payload, payload_size, name_end + 1 - payload)) {
        Py_RETURN_FALSE;
    }
    /* PolicyInspector._record_portal("", info), as known_bind does. */
    if (PyDict_GET_SIZE(self->portals) > self->max_portals) {
        PyDict_Clear(self->portals);
    }
    if (PyDict_SetItem(self->portals, EMPTY_NAME, statement->info) < 0) {
        return NULL;
    }
    Py_INCREF(statement->info);
    self->current_info = statement->info;
    self->current_tally = statement->tally;
    self->describe = describe;
    self->status = in_block ? 'T' : 'I';
    self->control = statement->control;
    self->spliced = 0;
    if (with_parse) {
        self->current_parse = Py_NewRef(parse->payload);
        self->current_prepared = Py_NewRef(parse->prepared);
    }
    self->outstanding = 1;
    self->started = now();
    self->bytes_in += size;
    int kind = self->control ? TOOK_CONTROL : TOOK; /* read before write() runs Python */
    return took(pass_on(self, self->upstream_write, data) < 0, kind);
}

/* tracker._count_rows of a CommandComplete payload [start, end); -1: too many digits. */
static long long count_rows(const unsigned char *buffer, Py_ssize_t start, Py_ssize_t end) {
    if (end > start && buffer[end - 1] == 0) {
        end--;
    }
    Py_ssize_t digits = end;
    while (digits > start && buffer[digits - 1] >= '0' && buffer[digits - 1] <= '9') {
        digits--;
    }
    if (digits == end || digits - 1 <= start || buffer[digits - 1] != ' ') {
        return 0;
    }
    if (end - digits > MAX_ROW_DIGITS) {
        return -1;
    }
    long long rows = 0;
    for (Py_ssize_t i = digits; i < end; i++) {
        rows = rows * 10 + (buffer[i] - '0');
    }
    return rows;
}

enum {
    EXPECT_HIDDEN_HEAD,
    EXPECT_HIDDEN_ROW,
    EXPECT_HIDDEN_DONE,
    EXPECT_PARSE,
    EXPECT_BIND,
    EXPECT_DESCRIBE,
    EXPECT_HEAD,
    EXPECT_ROWS,
    EXPECT_READY,
    DONE
};

/* The answer to the lane's request (``self``'s current one), if ``chunk`` is
   exactly all of it (what tracker._pass_bound consumes, ending in ReadyForQuery
   with the status it was sent in; for a Query, what pass_plain consumes of one
   statement's result, after the spliced set_config's row when it was spliced, and
   for transaction control ending in either status 'I' or 'T'): its row count,
   with ``hidden`` (the bytes of the spliced statement's result, in front) and
   ``ready`` (the status it ends with); -1: not that case. */
static long long whole_answer(const Lane *self, const unsigned char *chunk, Py_ssize_t size,
                              Py_ssize_t *hidden, unsigned char *ready) {
    int stage = EXPECT_BIND;
    if (self->spliced) {
        stage = EXPECT_HIDDEN_HEAD;
    } else if (self->current_info == NULL) { /* a Query */
        stage = EXPECT_HEAD;
    } else if (self->current_parse != NULL) {
        stage = EXPECT_PARSE;
    }
    int describe = self->describe;
    long long rows = 0;
    Py_ssize_t pos = 0;
    while (size - pos >= 5) {
        unsigned char type = chunk[pos];
        Py_ssize_t length = (Py_ssize_t)be32(chunk + pos + 1);
        if (length < 4 || length > size - pos - 1) {
            return -1;
        }
        Py_ssize_t end = pos + 1 + length;
        if (stage == EXPECT_HEAD) { /* a Query's RowDescription, if it returns rows */
            stage = EXPECT_ROWS;
            if (type == 'T') {
                pos = end;
                continue;
            }
        }
        switch (stage) {
        case EXPECT_HIDDEN_HEAD: /* set_config's one row, exactly, dropped whole */
            if (type != 'T') {
                return -1;
            }
            stage = EXPECT_HIDDEN_ROW;
            break;
        case EXPECT_HIDDEN_ROW:
            if (type != 'D') {
                return -1;
            }
            stage = EXPECT_HIDDEN_DONE;
            break;
        case EXPECT_HIDDEN_DONE:
            if (type != 'C') {
                return -1;
            }
            *hidden = end;
            stage = EXPECT_HEAD;
            break;
        case EXPECT_PARSE:
            if (type != '1') {
                return -1;
            }
            stage = EXPECT_BIND;
            break;
        case EXPECT_BIND:
            if (type != '2') {
                return -1;
            }
            stage = describe ? EXPECT_DESCRIBE : EXPECT_ROWS;
            break;
        case EXPECT_DESCRIBE:
            if (type != 'T' && type != 'n') {
                return -1;
            }
            stage = EXPECT_ROWS;
            break;
        case EXPECT_ROWS:
            if (type == 'D') {
                break;
            }
            if (type != 'C') {
                return -1;
            }
            rows = count_rows(chunk, pos + 5, end);
            if (rows < 0) {
                return -1;
            }
            stage = EXPECT_READY;
            break;
        case EXPECT_READY:
            if (type != 'Z' || length != 5) {
                return -1;
            }
            *ready = chunk[pos + 5];
            if (*ready != self->status &&
                !(self->control && (*ready == 'I' || *ready == 'T'))) {
                return -1; /* another change of the tracker's status: the Python way */
            }
            stage = DONE;
            break;
        default:
            return -1; /* more after the ReadyForQuery */
        }
        pos = end;
    }
    return stage == DONE && pos == size ? rows : -1;
}

static void tally(Lane *self, long long rows, double seconds) {
    Tally *tally = &self->tallies[self->current_tally];
    int bucket = 0; /* bisect.bisect_left(bounds, seconds) */
    while (bucket < self->bound_count && self->bounds[bucket] < seconds) {
        bucket++;
    }
    tally->allowed++;
    tally->buckets[bucket]++;
    tally->seconds += seconds;
    self->rows += rows;
}

/* known_parse's (and known_query's) `self._cache.hits += 1`. */
static int count_hit(PyObject *cache) {
    if (cache == NULL) {
        return 0;
    }
    PyObject *hits = PyObject_GetAttr(cache, HITS);
    if (hits == NULL) {
        return -1;
    }
    PyObject *more = PyNumber_Add(hits, ONE);
    Py_DECREF(hits);
    if (more == NULL) {
        return -1;
    }
    int failed = PyObject_SetAttr(cache, HITS, more);
    Py_DECREF(more);
    return failed;
}

/* The server now holds ``prepared`` as its unnamed statement (its Parse answered
   here): unless the lane knows it already does, the inspector confirms it, as
   known_parse and parse_resolved would have (lane_parsed, which makes the lane
   forget what the registry's change makes untrue). */
static int confirm_unnamed(Lane *self, PyObject *prepared) {
    if (self->confirm == NULL || prepared == NULL || prepared == self->unnamed) {
        return 0;
    }
    PyObject *result = PyObject_CallOneArg(self->confirm, prepared);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    Py_INCREF(prepared);
    Py_XSETREF(self->unnamed, prepared);
    return 0;
}

PyDoc_STRVAR(upstream_doc,
             "upstream(data) -> str | None\n\n"
             "Forward a server chunk that is exactly the answer to the lane's request (less\n"
             "the spliced set_config's result, if spliced): the transaction status it ends\n"
             "with ('I' or 'T'); None: not that case (the request, if any, is handed over\n"
             "first).");

static PyObject *Lane_upstream(Lane *self, PyObject *data) {
    if (!self->outstanding) {
        Py_RETURN_NONE;
    }
    long long rows = -1;
    Py_ssize_t hidden = 0;
    unsigned char ready = 0;
    if (PyBytes_CheckExact(data)) {
        rows = whole_answer(self, (const unsigned char *)PyBytes_AS_STRING(data),
                            PyBytes_GET_SIZE(data), &hidden, &ready);
    }
    if (rows < 0) {
        if (hand_over(self) < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    double seconds = now() - self->started;
    int with_parse = self->current_parse != NULL;
    PyObject *prepared = self->current_prepared; /* the reference taken over */
    self->current_prepared = NULL;
    self->outstanding = 0;
    Py_CLEAR(self->current_info);
    Py_CLEAR(self->current_parse);
    Py_CLEAR(self->current_sql);
    Py_CLEAR(self->current_command);
    tally(self, rows, seconds);
    if (with_parse && (count_hit(self->cache) < 0 || confirm_unnamed(self, prepared) < 0)) {
        Py_XDECREF(prepared);
        return NULL;
    }
    Py_XDECREF(prepared);
    PyObject *answer = data;
    if (hidden) {
        answer = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + hidden,
                                           PyBytes_GET_SIZE(data) - hidden);
        if (answer == NULL) {
            return NULL;
        }
    }
    self->bytes_out += PyBytes_GET_SIZE(answer);
    self->served++;
    int failed = pass_on(self, self->client_write, answer) < 0;
    if (hidden) {
        Py_DECREF(answer);
    }
    if (failed) {
        return NULL;
    }
    return Py_NewRef(ready == 'T' ? STATUS_IN_BLOCK : STATUS_IDLE);
}

PyDoc_STRVAR(hand_over_doc,
             "hand_over()\n\n"
             "Give the session the request the lane forwarded, if any (materialize).");

static PyObject *Lane_hand_over(Lane *self, PyObject *unused) {
    if (hand_over(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int find_tally(Lane *self, PyObject *command) {
    for (int i = 0; i < MAX_COMMANDS; i++) {
        PyObject *known = self->tallies[i].command;
        if (known == NULL) {
            Py_INCREF(command);
            self->tallies[i].command = command;
            return i;
        }
        int equal = PyObject_RichCompareBool(known, command, Py_EQ);
        if (equal < 0) {
            return -2;
        }
        if (equal) {
            return i;
        }
    }
    return -1;
}

PyDoc_STRVAR(learn_doc,
             "learn(name, numbers, info, command, plain, control=False) -> bool\n\n"
             "Binds of statement ``name`` (bytes) to the unnamed portal may pass here while\n"
             "their parameters ``numbers`` ($n, ascending) are the tenant's bytes in text\n"
             "format; they make the portal ``info``, counted under ``command``; ``plain``:\n"
             "neither transaction control nor DEALLOCATE ALL (may pass in a block);\n"
             "``control``: transaction control (may pass anywhere, client() says so, and its\n"
             "answer may change the status).  False: not learnt (a long name, too many\n"
             "parameters or labels).");

/* A statement's tenant parameters and metric label into ``statement`` (its name
   aside): 1 done, 0 not learnable, -1 error. */
static int fill_statement(Lane *self, Statement *statement, PyObject *numbers, PyObject *info,
                          PyObject *command, int plain, int control) {
    Py_ssize_t count = PyTuple_GET_SIZE(numbers);
    if (self->released || count > MAX_NUMBERS) {
        return 0;
    }
    uint16_t wanted[MAX_NUMBERS];
    for (Py_ssize_t i = 0; i < count; i++) {
        long number = PyLong_AsLong(PyTuple_GET_ITEM(numbers, i));
        if (number == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (number < 1 || number > 65535 || (i > 0 && number <= wanted[i - 1])) {
            return 0;
        }
        wanted[i] = (uint16_t)number;
    }
    int index = find_tally(self, command);
    if (index < 0) {
        return index == -2 ? -1 : 0;
    }
    Py_INCREF(info);
    Py_XSETREF(statement->info, info);
    statement->tally = index;
    statement->plain = plain && !control;
    statement->control = control;
    statement->count = (int)count;
    memcpy(statement->numbers, wanted, sizeof(uint16_t) * (size_t)count);
    return 1;
}

static PyObject *Lane_learn(Lane *self, PyObject *args) {
    PyObject *name, *numbers, *info, *command;
    int plain, control = 0;
    if (!PyArg_ParseTuple(args, "O!O!OUp|p", &PyBytes_Type, &name, &PyTuple_Type, &numbers, &info,
                          &command, &plain, &control)) {
        return NULL;
    }
    Py_ssize_t name_length = PyBytes_GET_SIZE(name);
    if (self->released || name_length > MAX_NAME) {
        Py_RETURN_FALSE;
    }
    Statement learnt = {0};
    int filled = fill_statement(self, &learnt, numbers, info, command, plain, control);
    if (filled <= 0) {
        Py_XDECREF(learnt.info);
        if (filled < 0) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    Statement *statement = find_statement(self, (const unsigned char *)PyBytes_AS_STRING(name),
                                          name_length);
    if (statement == NULL) {
        if (self->statement_count == MAX_STATEMENTS) {
            forget_named(self);
        }
        statement = &self->statements[self->statement_count++];
        statement->info = NULL;
    }
    PyObject *old_info = statement->info;
    *statement = learnt; /* every field fill_statement set, with the reference it took */
    Py_XDECREF(old_info);
    statement->name_length = (int)name_length;
    memcpy(statement->name, PyBytes_AS_STRING(name), (size_t)name_length);
    statement->name[name_length] = 0;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(learn_parse_doc,
             "learn_parse(payload, numbers, info, command, cache, plain, control=False) -> bool\n\n"
             "The unnamed statement the server holds is the Parse ``payload`` (bytes after\n"
             "the length), known_parse's ``prepared``: that Parse followed by a Bind of it may\n"
             "pass here (``numbers``, ``info``, ``command``, ``plain`` and ``control`` as for\n"
             "learn); ``cache.hits`` counts each, as known_parse does.  Attached with the\n"
             "inspector's known_parses, the lane keeps up to 16 such Parses across forget(),\n"
             "each passing while known_parses maps its payload to its ``prepared``, and has\n"
             "``confirm(prepared)`` record the one it took as the unnamed statement when the\n"
             "server has not got it already; otherwise only this one.  False: not learnt.");

static PyObject *Lane_learn_parse(Lane *self, PyObject *args) {
    PyObject *payload, *numbers, *info, *command, *cache, *prepared = Py_None;
    int plain, control = 0;
    if (!PyArg_ParseTuple(args, "O!O!OUOp|pO", &PyBytes_Type, &payload, &PyTuple_Type, &numbers,
                          &info, &command, &cache, &plain, &control, &prepared)) {
        return NULL;
    }
    KnownParse learnt = {0};
    int filled = fill_statement(self, &learnt.statement, numbers, info, command, plain, control);
    if (filled <= 0) {
        Py_XDECREF(learnt.statement.info);
        return filled < 0 ? NULL : Py_NewRef(Py_False);
    }
    KnownParse *parse = parse_of(self, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload));
    if (parse == NULL) {
        if (self->known_parses == NULL || self->parse_count == MAX_PARSES) {
            forget_parses(self); /* the Parse the server holds only, or the table full */
        }
        parse = &self->parses[self->parse_count++];
        *parse = (KnownParse){0};
    }
    Py_XDECREF(parse->statement.info);
    parse->statement = learnt.statement; /* with the reference fill_statement took */
    Py_INCREF(payload);
    Py_XSETREF(parse->payload, payload);
    Py_INCREF(prepared);
    Py_XSETREF(parse->prepared, prepared);
    if (self->known_parses != NULL) { /* the inspector just confirmed it */
        Py_INCREF(prepared);
        Py_XSETREF(self->unnamed, prepared);
    }
    Py_INCREF(cache);
    Py_XSETREF(self->cache, cache);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(learn_queries_doc,
             "learn_queries(known, controls, tenant_only, cache)\n\n"
             "Until the next forget(): a chunk that is a key of ``controls`` (the known\n"
             "messages that are one transaction-control statement), or, in enforce mode\n"
             "(known_queries), of ``known`` (message bytes -> (sql, analysis, command,\n"
             "constants)), whose constants are none or ``tenant_only`` may pass here,\n"
             "counting a hit in ``cache.hits``, as known_query allows it.  Only for a lane\n"
             "made with materialize_query.");

static PyObject *Lane_learn_queries(Lane *self, PyObject *args) {
    PyObject *known, *controls, *tenant_only, *cache;
    if (!PyArg_ParseTuple(args, "O!O!O!O", &PyDict_Type, &known, &PyDict_Type, &controls,
                          &PyFrozenSet_Type, &tenant_only, &cache)) {
        return NULL;
    }
    if (self->released || self->materialize_query == NULL) {
        Py_RETURN_NONE;
    }
    if (!self->known_queries) {
        known = NULL;
    }
    if (self->controls == controls && self->queries == known) {
        Py_RETURN_NONE;
    }
    Py_XINCREF(known);
    Py_INCREF(controls);
    Py_INCREF(tenant_only);
    Py_INCREF(cache);
    Py_XSETREF(self->queries, known);
    Py_XSETREF(self->controls, controls);
    Py_XSETREF(self->tenant_only, tenant_only);
    Py_XSETREF(self->query_cache, cache);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(learn_shapes_doc,
             "learn_shapes(routes, file_shaped)\n\n"
             "Until the next forget(): a chunk that is one Query whose text's digit key\n"
             "(every digit made 0) after the tenant's string literal is a key of ``routes``\n"
             "(-> (checks, command, analysis): PolicyInspector._teach_shape) and whose text\n"
             "passes its checks may pass here, once ``file_shaped(sql, message, analysis)``\n"
             "has filed it (False: not its case).  Only for a lane made with\n"
             "materialize_query.");

static PyObject *Lane_learn_shapes(Lane *self, PyObject *args) {
    PyObject *routes, *file_shaped;
    if (!PyArg_ParseTuple(args, "O!O", &PyDict_Type, &routes, &file_shaped)) {
        return NULL;
    }
    if (self->released || self->materialize_query == NULL || self->shapes == routes) {
        Py_RETURN_NONE;
    }
    Py_INCREF(routes);
    Py_INCREF(file_shaped);
    Py_XSETREF(self->shapes, routes);
    Py_XSETREF(self->file_shaped, file_shaped);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(forget_doc,
             "forget()\n\n"
             "The registry changed: forget every statement learnt but the Parses of the\n"
             "unnamed statement (all of them too for a lane attached without known_parses),\n"
             "and which of them the server holds.");

static PyObject *Lane_forget(Lane *self, PyObject *unused) {
    forget_registry(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(attach_doc,
             "attach(portals, max_portals, known_parses=None, confirm=None)\n\n"
             "Serve an inspector: record the unnamed portal in ``portals`` (its portal map,\n"
             "emptied first when it holds more than ``max_portals``); forget what an earlier\n"
             "inspector taught; with its known Parses and lane_parsed, see learn_parse.");

static PyObject *Lane_attach(Lane *self, PyObject *args) {
    PyObject *portals, *known_parses = Py_None, *confirm = Py_None;
    Py_ssize_t max_portals;
    if (!PyArg_ParseTuple(args, "O!n|OO", &PyDict_Type, &portals, &max_portals, &known_parses,
                          &confirm)) {
        return NULL;
    }
    if ((known_parses == Py_None) != (confirm == Py_None) ||
        (known_parses != Py_None && !PyDict_CheckExact(known_parses))) {
        PyErr_SetString(PyExc_TypeError, "known_parses (a dict) and confirm come together");
        return NULL;
    }
    forget_statements(self);
    if (!self->released) {
        Py_INCREF(portals);
        Py_XSETREF(self->portals, portals);
        self->max_portals = max_portals;
        if (known_parses != Py_None) {
            self->known_parses = Py_NewRef(known_parses);
            self->confirm = Py_NewRef(confirm);
        }
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(report_to_doc,
             "report_to(mark, bounds)\n\n"
             "Tally statement durations in buckets of ``bounds`` (ascending seconds) and call\n"
             "``mark()`` when a tally starts after a take().");

static PyObject *Lane_report_to(Lane *self, PyObject *args) {
    PyObject *mark, *bounds;
    if (!PyArg_ParseTuple(args, "OO!", &mark, &PyTuple_Type, &bounds)) {
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(bounds);
    if (count > MAX_BOUNDS) {
        PyErr_SetString(PyExc_ValueError, "too many bounds");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        double bound = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (bound == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        self->bounds[i] = bound;
    }
    self->bound_count = (int)count;
    Py_INCREF(mark);
    Py_XSETREF(self->mark, mark);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(take_doc,
             "take() -> (bytes_in, bytes_out, rows, ((command, allowed, buckets, seconds), ...))\n\n"
             "What the lane tallied since the last take(), and start again from zero.");

static PyObject *Lane_take(Lane *self, PyObject *unused) {
    PyObject *commands = PyList_New(0);
    if (commands == NULL) {
        return NULL;
    }
    for (int i = 0; i < MAX_COMMANDS; i++) {
        Tally *tally = &self->tallies[i];
        if (tally->command == NULL || tally->allowed == 0) {
            continue;
        }
        PyObject *buckets = PyTuple_New(self->bound_count + 1);
        if (buckets == NULL) {
            Py_DECREF(commands);
            return NULL;
        }
        for (int b = 0; b <= self->bound_count; b++) {
            PyObject *value = PyLong_FromLongLong(tally->buckets[b]);
            if (value == NULL) {
                Py_DECREF(buckets);
                Py_DECREF(commands);
                return NULL;
            }
            PyTuple_SET_ITEM(buckets, b, value);
        }
        PyObject *item = Py_BuildValue("(OLNd)", tally->command, tally->allowed, buckets,
                                       tally->seconds);
        if (item == NULL || PyList_Append(commands, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(commands);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyObject *taken = Py_BuildValue("(LLLN)", self->bytes_in, self->bytes_out, self->rows,
                                    PyList_AsTuple(commands));
    Py_DECREF(commands);
    if (taken == NULL) {
        return NULL;
    }
    for (int i = 0; i < MAX_COMMANDS; i++) {
        Tally *tally = &self->tallies[i];
        tally->allowed = 0;
        tally->seconds = 0.0;
        memset(tally->buckets, 0, sizeof(tally->buckets));
    }
    self->bytes_in = self->bytes_out = self->rows = 0;
    self->dirty = 0;
    return taken;
}

PyDoc_STRVAR(release_doc,
             "release()\n\n"
             "The session ended: hand over the request still due, drop every reference to\n"
             "the session (the tallies stay for take()); the lane then handles nothing.");

static PyObject *Lane_release(Lane *self, PyObject *unused) {
    if (hand_over(self) < 0) {
        return NULL;
    }
    Lane_clear(self);
    Py_RETURN_NONE;
}

static PyObject *Lane_get_outstanding(Lane *self, void *closure) {
    return PyBool_FromLong(self->outstanding);
}

static PyObject *Lane_get_served(Lane *self, void *closure) {
    return PyLong_FromLongLong(self->served);
}

static PyObject *Lane_get_learnt(Lane *self, void *closure) {
    return PyLong_FromLong(self->statement_count + self->parse_count +
                           (self->queries != NULL) + (self->controls != NULL) +
                           (self->shapes != NULL));
}

static PyMethodDef Lane_methods[] = {
    {"client", (PyCFunction)(void (*)(void))Lane_client, METH_FASTCALL, client_doc},
    {"upstream", (PyCFunction)Lane_upstream, METH_O, upstream_doc},
    {"hand_over", (PyCFunction)Lane_hand_over, METH_NOARGS, hand_over_doc},
    {"learn", (PyCFunction)Lane_learn, METH_VARARGS, learn_doc},
    {"learn_parse", (PyCFunction)Lane_learn_parse, METH_VARARGS, learn_parse_doc},
    {"learn_queries", (PyCFunction)Lane_learn_queries, METH_VARARGS, learn_queries_doc},
    {"learn_shapes", (PyCFunction)Lane_learn_shapes, METH_VARARGS, learn_shapes_doc},
    {"forget", (PyCFunction)Lane_forget, METH_NOARGS, forget_doc},
    {"attach", (PyCFunction)Lane_attach, METH_VARARGS, attach_doc},
    {"report_to", (PyCFunction)Lane_report_to, METH_VARARGS, report_to_doc},
    {"take", (PyCFunction)Lane_take, METH_NOARGS, take_doc},
    {"release", (PyCFunction)Lane_release, METH_NOARGS, release_doc},
    {NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"outstanding", (getter)Lane_get_outstanding, NULL, "A request forwarded here awaits its answer.", NULL},
    {"served", (getter)Lane_get_served, NULL, "Statements answered here.", NULL},
    {"learnt", (getter)Lane_get_learnt, NULL,
     "Statements the lane may pass now (the known Queries count as one, the known "
     "transaction control as one, the text shapes as one).",
     NULL},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tenantgate._lane.Lane",
    .tp_doc = "One session's steady-state lane (see the module docstring).",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_traverse = (traverseproc)Lane_traverse,
    .tp_clear = (inquiry)Lane_clear,
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
};

static PyObject *lane_clock(PyObject *module, PyObject *unused) { return PyFloat_FromDouble(now()); }

static PyMethodDef module_methods[] = {
    {"clock", lane_clock, METH_NOARGS, "The lane's clock (time.perf_counter's), in seconds."},
    {NULL},
};

static struct PyModuleDef lane_module = {
    PyModuleDef_HEAD_INIT, "tenantgate._lane",
    "The steady-state lane: a prepared statement's per-statement path in C.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__lane(void) {
    if (PyType_Ready(&LaneType) < 0) {
        return NULL;
    }
    EMPTY_NAME = PyUnicode_InternFromString("");
    HITS = PyUnicode_InternFromString("hits");
    ONE = PyLong_FromLong(1);
    STATUS_IDLE = PyUnicode_InternFromString("I");
    STATUS_IN_BLOCK = PyUnicode_InternFromString("T");
    if (EMPTY_NAME == NULL || HITS == NULL || ONE == NULL || STATUS_IDLE == NULL ||
        STATUS_IN_BLOCK == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&lane_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(module, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "TOOK_CONTROL", TOOK_CONTROL) < 0 ||
        PyModule_AddIntConstant(module, "TOOK_SPLICED", TOOK_SPLICED) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
