/*
 * gateway._heads: the data plane's plain-head checks in C (gateway/heads.py is the contract).
 *
 * Why C: on the common request (one whole HTTP/1.1 head in one read, nothing the gateway acts on)
 * and the common response (HTTP/1.1, one plain Content-Length, nothing hop-by-hop), the Python
 * fast paths spent about a quarter of their per-request instructions on two regex scans, two
 * llhttp validations and the slicing around them. Here one pass over the bytes does all of it.
 *
 * Why it is as safe as what it replaces: it accepts only a strict whitelist grammar, narrower
 * than what llhttp's strict mode accepts (so nothing llhttp would refuse is ever accepted; the
 * differential tests in tests/test_heads.py check this against gateway/heads.py's regex + llhttp
 * reference on many hostile heads). Anything outside the grammar returns None, and the caller
 * takes the httptools parsing path, which answers 400 (request) or 502 (response) for malformed
 * heads exactly as before. A head is accepted only if every byte was checked:
 *
 *   request-line = method SP "/" *VCHAR SP "HTTP/1.1" CRLF      (method: a short fixed list)
 *   field-line   = token ":" *( SP / HTAB ) *( HTAB / SP / VCHAR / obs-text ) CRLF
 *   status-line  = "HTTP/1.1" SP 3DIGIT SP *( HTAB / SP / VCHAR / obs-text ) CRLF
 *
 * CR and LF appear only as CRLF line ends, so bare CR, bare LF, obs-fold (a line starting with
 * SP or HTAB is not a token), NUL and other controls are all refused.
 *
 * Memory safety: a bytes object always has a NUL after its last byte, and NUL is in none of the
 * byte classes below, so every scan stops at or before the end without a length check; the
 * index only moves past a byte that was checked to be non-NUL (or past a checked CRLF pair).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static unsigned char TCHAR[256];  /* token characters (RFC 9110 §5.6.2) */
static unsigned char VALUE[256];  /* field value bytes: HTAB, SP, VCHAR, obs-text */
static unsigned char TARGET[256]; /* request-target bytes after the leading "/": VCHAR */

static void
init_tables(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        VALUE[c] = c == '\t' || (c >= 0x20 && c != 0x7f);
        TARGET[c] = c > 0x20 && c < 0x7f;
    }
    for (const char *p = extra; *p; p++) {
        TCHAR[(unsigned char)*p] = 1;
    }
}

/* Header names the gateway acts on. */
enum { ORDINARY = 0, HOST, CONTENT_LENGTH, SPECIAL };

/* Whether the `len` bytes at `s` are `lower` (a lowercase name), ignoring ASCII case; with
 * `twin`, reading "_" as "-" too. */
static inline int
name_matches(const unsigned char *s, Py_ssize_t len, const char *lower, int twin)
{
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = s[i];
        if (c >= 'A' && c <= 'Z') {
            c += 32;
        }
        else if (twin && c == '_') {
            c = '-';
        }
        if (c != (unsigned char)lower[i]) {
            return 0;
        }
    }
    return 1;
}

/* A response header name is what it says (llhttp frames by exactly these names). */
static int
name_is(const unsigned char *s, Py_ssize_t len, const char *lower)
{
    return name_matches(s, len, lower, 0);
}

/* A request header name, or its twin with "_" for "-": WSGI servers name "X_Forwarded_For"
 * and "X-Forwarded-For" alike, so the twin of a header the gateway acts on takes the parsing
 * path too (which drops it). */
static int
twin_is(const unsigned char *s, Py_ssize_t len, const char *lower)
{
    return name_matches(s, len, lower, 1);
}

static int
starts_proxy(const unsigned char *s, Py_ssize_t len)
{
    return len >= 6 && name_is(s, 6, "proxy-");
}

/*
 * A request header's kind: HOST, SPECIAL (the parsing path must see the request: framing,
 * Expect, hop-by-hop, X-Forwarded-*, Forwarded, Proxy-*) or ORDINARY.
 */
static int
request_header_kind(const unsigned char *s, Py_ssize_t len)
{
    if (len >= 6 && twin_is(s, 6, "proxy-")) {
        return SPECIAL;
    }
    switch (len) {
    case 2:
        return twin_is(s, 2, "te") ? SPECIAL : ORDINARY;
    case 4:
        return twin_is(s, 4, "host") ? HOST : ORDINARY;
    case 6:
        return twin_is(s, 6, "expect") ? SPECIAL : ORDINARY;
    case 7:
        return twin_is(s, 7, "trailer") || twin_is(s, 7, "upgrade") ? SPECIAL : ORDINARY;
    case 9:
        return twin_is(s, 9, "forwarded") ? SPECIAL : ORDINARY;
    case 10:
        return twin_is(s, 10, "connection") || twin_is(s, 10, "keep-alive") ? SPECIAL : ORDINARY;
    case 14:
        return twin_is(s, 14, "content-length") ? SPECIAL : ORDINARY;
    case 15:
        return twin_is(s, 15, "x-forwarded-for") ? SPECIAL : ORDINARY;
    case 16:
        return twin_is(s, 16, "x-forwarded-host") ? SPECIAL : ORDINARY;
    case 17:
        return twin_is(s, 17, "transfer-encoding") || twin_is(s, 17, "x-forwarded-proto")
                   ? SPECIAL
                   : ORDINARY;
    }
    return ORDINARY;
}

/* A response header's kind: CONTENT_LENGTH, SPECIAL (hop-by-hop or framing) or ORDINARY. */
static int
response_header_kind(const unsigned char *s, Py_ssize_t len)
{
    if (starts_proxy(s, len)) {
        return SPECIAL;
    }
    switch (len) {
    case 2:
        return name_is(s, 2, "te") ? SPECIAL : ORDINARY;
    case 7:
        return name_is(s, 7, "trailer") || name_is(s, 7, "upgrade") ? SPECIAL : ORDINARY;
    case 10:
        return name_is(s, 10, "connection") || name_is(s, 10, "keep-alive") ? SPECIAL : ORDINARY;
    case 14:
        return name_is(s, 14, "content-length") ? CONTENT_LENGTH : ORDINARY;
    case 17:
        return name_is(s, 17, "transfer-encoding") ? SPECIAL : ORDINARY;
    }
    return ORDINARY;
}

/* Methods taken: never special to the gateway (not CONNECT). Each is one bytes object made at
 * import and shared by every request (no allocation per request). */
enum { GET, PUT, HEAD_, POST, PATCH, DELETE, OPTIONS, N_METHODS };
static const char *const METHOD_NAMES[N_METHODS] = {"GET",   "PUT",    "HEAD",   "POST",
                                                    "PATCH", "DELETE", "OPTIONS"};
static PyObject *METHODS[N_METHODS];

/* The shared bytes object for the method s[0:len], or NULL if it is not one taken. */
static PyObject *
plain_method(const unsigned char *s, Py_ssize_t len)
{
    int m;
    switch (len) {
    case 3:
        m = memcmp(s, "GET", 3) == 0 ? GET : memcmp(s, "PUT", 3) == 0 ? PUT : -1;
        break;
    case 4:
        m = memcmp(s, "HEAD", 4) == 0 ? HEAD_ : memcmp(s, "POST", 4) == 0 ? POST : -1;
        break;
    case 5:
        m = memcmp(s, "PATCH", 5) == 0 ? PATCH : -1;
        break;
    case 6:
        m = memcmp(s, "DELETE", 6) == 0 ? DELETE : -1;
        break;
    case 7:
        m = memcmp(s, "OPTIONS", 7) == 0 ? OPTIONS : -1;
        break;
    default:
        m = -1;
    }
    return m < 0 ? NULL : METHODS[m];
}

/*
 * The last Host (lowercased) and request target returned, reused when the next request carries
 * the same bytes: a keep-alive connection, or a load generator, sends the same ones over and
 * over, and a reused bytes object is neither allocated nor hashed again (its hash is cached), so
 * the Host's routing-dict lookup is cheaper too. Only read and replaced with the GIL held.
 */
static PyObject *last_host;
static PyObject *last_target;

/* A new reference to s[0:len] lowercased as bytes; NULL with an exception set on failure. */
static PyObject *
same_host(const unsigned char *s, Py_ssize_t len)
{
    PyObject *last = last_host;
    if (last != NULL && PyBytes_GET_SIZE(last) == len) {
        const unsigned char *h = (const unsigned char *)PyBytes_AS_STRING(last);
        Py_ssize_t i = 0;
        while (i < len && (s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]) == h[i]) {
            i++;
        }
        if (i == len) {
            Py_INCREF(last);
            return last;
        }
    }
    PyObject *host = PyBytes_FromStringAndSize(NULL, len);
    if (host == NULL) {
        return NULL;
    }
    char *h = PyBytes_AS_STRING(host);
    for (Py_ssize_t i = 0; i < len; i++) {
        h[i] = (char)(s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]);
    }
    Py_INCREF(host);
    Py_XSETREF(last_host, host);
    return host;
}

/* A new reference to s[0:len] as bytes; NULL with an exception set on failure. */
static PyObject *
same_target(const unsigned char *s, Py_ssize_t len)
{
    PyObject *last = last_target;
    if (last != NULL && PyBytes_GET_SIZE(last) == len &&
        memcmp(PyBytes_AS_STRING(last), s, len) == 0) {
        Py_INCREF(last);
        return last;
    }
    PyObject *target = PyBytes_FromStringAndSize((const char *)s, len);
    if (target == NULL) {
        return NULL;
    }
    Py_INCREF(target);
    Py_XSETREF(last_target, target);
    return target;
}

PyDoc_STRVAR(plain_request_doc,
             "plain_request(data, max_size, forwarded, /)\n--\n\n"
             "(method, target, host, forward_head) for a plain request head, else None.\n"
             "See gateway.heads.plain_request_py for the contract.");

static PyObject *
plain_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "plain_request takes 3 arguments");
        return NULL;
    }
    PyObject *data = args[0], *forwarded = args[2];
    if (!PyBytes_Check(data) || !PyBytes_Check(forwarded)) {
        Py_RETURN_NONE; /* not what a transport delivers: let the parsing path decide */
    }
    Py_ssize_t max_size = PyLong_AsSsize_t(args[1]);
    if (max_size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    /* Exactly one head, ending where this read ends (its empty line is checked below to be
     * the first one), and not too big (the parsing path answers 431). */
    if (n > max_size || n < 4 || memcmp(s + n - 4, "\r\n\r\n", 4) != 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t p = 0;
    while (s[p] >= 'A' && s[p] <= 'Z') {
        p++;
    }
    Py_ssize_t method_len = p;
    PyObject *method = plain_method(s, method_len);
    if (method == NULL || s[p] != ' ' || s[p + 1] != '/') {
        Py_RETURN_NONE;
    }
    p += 2;
    Py_ssize_t target_at = method_len + 1;
    while (TARGET[s[p]]) {
        p++;
    }
    Py_ssize_t target_end = p;
    if (n - p < 11 || memcmp(s + p, " HTTP/1.1\r\n", 11) != 0) {
        Py_RETURN_NONE;
    }
    p += 11;
    Py_ssize_t host_at = -1, host_end = -1;
    for (;;) {
        if (s[p] == '\r') {
            /* The empty line: it must be the end of `data` (a second head, or bytes of a body,
             * after it means this is not one plain head). */
            if (p + 2 != n) {
                Py_RETURN_NONE;
            }
            break;
        }
        Py_ssize_t name_at = p;
        while (TCHAR[s[p]]) {
            p++;
        }
        Py_ssize_t name_len = p - name_at;
        if (name_len == 0 || s[p] != ':') {
            Py_RETURN_NONE;
        }
        int kind = request_header_kind(s + name_at, name_len);
        if (kind == SPECIAL) {
            Py_RETURN_NONE;
        }
        p++;
        while (s[p] == ' ' || s[p] == '\t') {
            p++;
        }
        Py_ssize_t value_at = p;
        if (kind == HOST) {
            if (host_at >= 0) {
                Py_RETURN_NONE; /* two Host headers: the parsing path answers 400 */
            }
            /* A plain Host: visible ASCII up to the line end (no trailing whitespace). */
            while (s[p] > 0x20 && s[p] < 0x7f) {
                p++;
            }
            if (p == value_at) {
                Py_RETURN_NONE;
            }
            host_at = value_at;
            host_end = p;
        }
        else {
            while (VALUE[s[p]]) {
                p++;
            }
        }
        if (s[p] != '\r' || s[p + 1] != '\n') {
            Py_RETURN_NONE;
        }
        p += 2;
    }
    if (host_at < 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t host_len = host_end - host_at;
    PyObject *host = same_host(s + host_at, host_len);
    if (host == NULL) {
        return NULL;
    }
    const char *h = PyBytes_AS_STRING(host);
    /* The head as it came, minus its final CRLF, plus the X-Forwarded-* lines (`forwarded`
     * ends with "X-Forwarded-Host: "), the lowercased Host and the empty line. */
    Py_ssize_t fwd_len = PyBytes_GET_SIZE(forwarded);
    PyObject *head = PyBytes_FromStringAndSize(NULL, n - 2 + fwd_len + host_len + 4);
    if (head == NULL) {
        Py_DECREF(host);
        return NULL;
    }
    char *o = PyBytes_AS_STRING(head);
    memcpy(o, s, n - 2);
    o += n - 2;
    memcpy(o, PyBytes_AS_STRING(forwarded), fwd_len);
    o += fwd_len;
    memcpy(o, h, host_len);
    o += host_len;
    memcpy(o, "\r\n\r\n", 4);
    PyObject *target = same_target(s + target_at, target_end - target_at);
    if (target == NULL) {
        Py_DECREF(host);
        Py_DECREF(head);
        return NULL;
    }
    PyObject *result = PyTuple_New(4);
    if (result == NULL) {
        Py_DECREF(target);
        Py_DECREF(host);
        Py_DECREF(head);
        return NULL;
    }
    Py_INCREF(method);
    PyTuple_SET_ITEM(result, 0, method);
    PyTuple_SET_ITEM(result, 1, target);
    PyTuple_SET_ITEM(result, 2, host);
    PyTuple_SET_ITEM(result, 3, head);
    return result;
}

/*
 * Where the body starts in a plain response head at the start of s[0:n] (n == the bytes
 * object's size, s[n] == NUL), storing its Content-Length; -1 if the head is not plain.
 */
static Py_ssize_t
parse_response(const unsigned char *s, Py_ssize_t n, long long *content_length)
{
    if (n < 13 || memcmp(s, "HTTP/1.1 ", 9) != 0 || s[12] != ' ') {
        return -1;
    }
    if (s[9] < '2' || s[9] > '5' || s[10] < '0' || s[10] > '9' || s[11] < '0' || s[11] > '9') {
        return -1; /* 1xx (and anything not a status) take the parsing path */
    }
    int status = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    if (status == 204 || status == 304) {
        return -1; /* no body whatever the headers say: the parsing path frames these */
    }
    Py_ssize_t p = 13;
    while (VALUE[s[p]]) {
        p++; /* the reason phrase */
    }
    if (s[p] != '\r' || s[p + 1] != '\n') {
        return -1;
    }
    p += 2;
    long long length = -1;
    for (;;) {
        if (s[p] == '\r') {
            if (s[p + 1] != '\n') {
                return -1;
            }
            p += 2;
            break;
        }
        Py_ssize_t name_at = p;
        while (TCHAR[s[p]]) {
            p++;
        }
        Py_ssize_t name_len = p - name_at;
        if (name_len == 0 || s[p] != ':') {
            return -1; /* also a head that has not fully arrived: NUL ends the scan */
        }
        int kind = response_header_kind(s + name_at, name_len);
        if (kind == SPECIAL) {
            return -1;
        }
        p++;
        while (s[p] == ' ' || s[p] == '\t') {
            p++;
        }
        if (kind == CONTENT_LENGTH) {
            if (length >= 0) {
                return -1; /* a second Content-Length, even an equal one */
            }
            Py_ssize_t digits_at = p;
            long long value = 0;
            while (s[p] >= '0' && s[p] <= '9') {
                if (p - digits_at == 15) {
                    return -1; /* more than 15 digits: the parsing path decides */
                }
                value = value * 10 + (s[p] - '0');
                p++;
            }
            if (p == digits_at) {
                return -1;
            }
            while (s[p] == ' ' || s[p] == '\t') {
                p++;
            }
            length = value;
        }
        else {
            while (VALUE[s[p]]) {
                p++;
            }
        }
        if (s[p] != '\r' || s[p + 1] != '\n') {
            return -1;
        }
        p += 2;
    }
    if (length < 0) {
        return -1; /* no Content-Length: close-delimited, the parsing path re-frames it */
    }
    *content_length = length;
    return p;
}

PyDoc_STRVAR(response_head_doc,
             "response_head(data, /)\n--\n\n"
             "(body_at, content_length) for a plain response head at the start of data, else\n"
             "None. See gateway.heads.response_head_py for the contract.");

static PyObject *
response_head(PyObject *module, PyObject *data)
{
    if (!PyBytes_Check(data)) {
        Py_RETURN_NONE;
    }
    long long length;
    Py_ssize_t body_at =
        parse_response((const unsigned char *)PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                       &length);
    if (body_at < 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(nL)", body_at, length);
}

PyDoc_STRVAR(plain_response_doc,
             "plain_response(data, /)\n--\n\n"
             "Body bytes still to come after data, for a plain response head at its start\n"
             "(negative: data holds that many bytes past the body), else None. See\n"
             "gateway.heads.plain_response_py for the contract.");

static PyObject *
plain_response(PyObject *module, PyObject *data)
{
    if (!PyBytes_Check(data)) {
        Py_RETURN_NONE;
    }
    long long length;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t body_at = parse_response((const unsigned char *)PyBytes_AS_STRING(data), n, &length);
    if (body_at < 0) {
        Py_RETURN_NONE;
    }
    /* One int, not a tuple: the common caller needs only this (no allocation below 257). */
    return PyLong_FromLongLong(length - (long long)(n - body_at));
}

static PyMethodDef methods[] = {
    {"plain_request", (PyCFunction)(void (*)(void))plain_request, METH_FASTCALL,
     plain_request_doc},
    {"plain_response", (PyCFunction)plain_response, METH_O, plain_response_doc},
    {"response_head", (PyCFunction)response_head, METH_O, response_head_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "gateway._heads",
    "The data plane's plain-head checks in C; gateway/heads.py is the contract.",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__heads(void)
{
    init_tables();
    for (int m = 0; m < N_METHODS; m++) {
        if (METHODS[m] == NULL) {
            METHODS[m] = PyBytes_FromString(METHOD_NAMES[m]); /* kept for the process's life */
            if (METHODS[m] == NULL) {
                return NULL;
            }
        }
    }
    return PyModule_Create(&module_def);
}
