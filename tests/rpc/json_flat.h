/* json_flat.h -- a strict RFC 8259 parser for one flat JSON object (string
 * keys, scalar values: what eplbd's log lines are, docs/deploy.md "Logs"),
 * for the tests that read those lines.  Strict on purpose: raw control
 * bytes, invalid UTF-8, bad escapes, lone surrogates, leading zeros,
 * trailing garbage and duplicate keys are all refused; a nested value is
 * refused too (the log contract is flat).  Strings are decoded (escapes
 * resolved) into the object's own storage. */
#ifndef JSON_FLAT_H
#define JSON_FLAT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JF_MAX_FIELDS 48

typedef enum { JF_STRING, JF_NUMBER, JF_TRUE, JF_FALSE, JF_NULL } jf_type;

typedef struct jf_field {
    char *key;
    jf_type type;
    char *str;      /* JF_STRING: decoded bytes, NUL-terminated (may hold NULs: see len) */
    size_t len;
    double num;     /* JF_NUMBER */
    char raw[64];   /* JF_NUMBER: as written */
} jf_field;

typedef struct jf_object {
    jf_field f[JF_MAX_FIELDS];
    size_t n;
    char store[16384]; /* decoded keys and strings */
    size_t used;
    char error[160];
} jf_object;

typedef struct jf_cur {
    const unsigned char *s, *end;
    jf_object *o;
} jf_cur;

static inline int jf_fail(jf_cur *c, const char *why) {
    /* The first failure wins; jf_parse adds where it happened. */
    if (!c->o->error[0])
        snprintf(c->o->error, sizeof c->o->error, "%s", why);
    return -1;
}

static inline void jf_ws(jf_cur *c) {
    while (c->s < c->end && (*c->s == ' ' || *c->s == '\t' || *c->s == '\n' || *c->s == '\r'))
        c->s++;
}

static inline int jf_put(jf_cur *c, uint32_t cp) {
    jf_object *o = c->o;
    unsigned char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (unsigned char)(0xC0 | cp >> 6);
        b[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | cp >> 12);
        b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | cp >> 18);
        b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    if (o->used + n + 1 > sizeof o->store)
        return jf_fail(c, "string store full");
    memcpy(o->store + o->used, b, n);
    o->used += n;
    return 0;
}

static inline int jf_hex4(jf_cur *c, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < 4; i++) {
        if (c->s >= c->end)
            return jf_fail(c, "short \\u escape");
        unsigned ch = *c->s++;
        *v <<= 4;
        if (ch >= '0' && ch <= '9')
            *v |= ch - '0';
        else if (ch >= 'a' && ch <= 'f')
            *v |= ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F')
            *v |= ch - 'A' + 10;
        else
            return jf_fail(c, "bad hex digit in \\u escape");
    }
    return 0;
}

/* A string at c->s (at its opening quote): decoded into the store. */
static inline int jf_string(jf_cur *c, char **out, size_t *out_len) {
    jf_object *o = c->o;
    if (c->s >= c->end || *c->s != '"')
        return jf_fail(c, "string expected");
    c->s++;
    size_t start = o->used;
    for (;;) {
        if (c->s >= c->end)
            return jf_fail(c, "unterminated string");
        unsigned ch = *c->s;
        if (ch == '"') {
            c->s++;
            break;
        }
        if (ch < 0x20)
            return jf_fail(c, "raw control byte in string");
        if (ch == '\\') {
            c->s++;
            if (c->s >= c->end)
                return jf_fail(c, "unterminated escape");
            unsigned e = *c->s++;
            uint32_t cp;
            switch (e) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            case 'u':
                if (jf_hex4(c, &cp))
                    return -1;
                if (cp >= 0xDC00 && cp <= 0xDFFF)
                    return jf_fail(c, "lone low surrogate");
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t lo;
                    if (c->end - c->s < 6 || c->s[0] != '\\' || c->s[1] != 'u')
                        return jf_fail(c, "lone high surrogate");
                    c->s += 2;
                    if (jf_hex4(c, &lo))
                        return -1;
                    if (lo < 0xDC00 || lo > 0xDFFF)
                        return jf_fail(c, "bad low surrogate");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                break;
            default: return jf_fail(c, "bad escape");
            }
            if (jf_put(c, cp))
                return -1;
            continue;
        }
        /* A raw byte: must start a valid UTF-8 sequence, copied as is. */
        size_t n;
        uint32_t cp;
        if (ch < 0x80) {
            n = 1;
            cp = ch;
        } else if (ch >= 0xC2 && ch <= 0xDF) {
            n = 2;
            cp = ch & 0x1F;
        } else if (ch >= 0xE0 && ch <= 0xEF) {
            n = 3;
            cp = ch & 0x0F;
        } else if (ch >= 0xF0 && ch <= 0xF4) {
            n = 4;
            cp = ch & 0x07;
        } else {
            return jf_fail(c, "invalid UTF-8 lead byte");
        }
        if ((size_t)(c->end - c->s) < n)
            return jf_fail(c, "truncated UTF-8 sequence");
        for (size_t i = 1; i < n; i++) {
            if ((c->s[i] & 0xC0) != 0x80)
                return jf_fail(c, "invalid UTF-8 continuation");
            cp = (cp << 6) | (c->s[i] & 0x3F);
        }
        if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
            return jf_fail(c, "overlong or surrogate UTF-8");
        if (o->used + n + 1 > sizeof o->store)
            return jf_fail(c, "string store full");
        memcpy(o->store + o->used, c->s, n);
        o->used += n;
        c->s += n;
    }
    *out = o->store + start;
    *out_len = o->used - start;
    o->store[o->used++] = '\0';
    return 0;
}

static inline int jf_number(jf_cur *c, jf_field *f) {
    const unsigned char *b = c->s;
    if (c->s < c->end && *c->s == '-')
        c->s++;
    if (c->s >= c->end)
        return jf_fail(c, "bad number");
    if (*c->s == '0') {
        c->s++;
    } else if (*c->s >= '1' && *c->s <= '9') {
        while (c->s < c->end && *c->s >= '0' && *c->s <= '9')
            c->s++;
    } else {
        return jf_fail(c, "bad number");
    }
    if (c->s < c->end && *c->s == '.') {
        c->s++;
        if (c->s >= c->end || *c->s < '0' || *c->s > '9')
            return jf_fail(c, "bad fraction");
        while (c->s < c->end && *c->s >= '0' && *c->s <= '9')
            c->s++;
    }
    if (c->s < c->end && (*c->s == 'e' || *c->s == 'E')) {
        c->s++;
        if (c->s < c->end && (*c->s == '+' || *c->s == '-'))
            c->s++;
        if (c->s >= c->end || *c->s < '0' || *c->s > '9')
            return jf_fail(c, "bad exponent");
        while (c->s < c->end && *c->s >= '0' && *c->s <= '9')
            c->s++;
    }
    size_t n = (size_t)(c->s - b);
    if (n >= sizeof f->raw)
        return jf_fail(c, "number too long");
    memcpy(f->raw, b, n);
    f->raw[n] = '\0';
    f->num = strtod(f->raw, NULL);
    f->type = JF_NUMBER;
    return 0;
}

static inline int jf_lit(jf_cur *c, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(c->end - c->s) < n || memcmp(c->s, w, n) != 0)
        return jf_fail(c, "bad literal");
    c->s += n;
    return 0;
}

/* Parse s[0, len) as one flat object; 0 or -1 with o->error set. */
static inline int jf_parse(const char *s, size_t len, jf_object *o) {
    memset(o, 0, sizeof *o);
    jf_cur c = { (const unsigned char *)s, (const unsigned char *)s + len, o };
    const unsigned char *begin = c.s;
    int rc = -1;
    jf_ws(&c);
    if (c.s >= c.end || *c.s != '{') {
        jf_fail(&c, "object expected");
        goto done;
    }
    c.s++;
    jf_ws(&c);
    if (c.s < c.end && *c.s == '}') {
        c.s++;
    } else {
        for (;;) {
            if (o->n == JF_MAX_FIELDS) {
                jf_fail(&c, "too many fields");
                goto done;
            }
            jf_field *f = &o->f[o->n];
            size_t klen;
            jf_ws(&c);
            if (jf_string(&c, &f->key, &klen))
                goto done;
            if (strlen(f->key) != klen) {
                jf_fail(&c, "NUL in a key");
                goto done;
            }
            for (size_t i = 0; i < o->n; i++)
                if (strcmp(o->f[i].key, f->key) == 0) {
                    jf_fail(&c, "duplicate key");
                    goto done;
                }
            jf_ws(&c);
            if (c.s >= c.end || *c.s != ':') {
                jf_fail(&c, "':' expected");
                goto done;
            }
            c.s++;
            jf_ws(&c);
            if (c.s >= c.end) {
                jf_fail(&c, "value expected");
                goto done;
            }
            unsigned ch = *c.s;
            if (ch == '"') {
                f->type = JF_STRING;
                if (jf_string(&c, &f->str, &f->len))
                    goto done;
            } else if (ch == 't') {
                f->type = JF_TRUE;
                if (jf_lit(&c, "true"))
                    goto done;
            } else if (ch == 'f') {
                f->type = JF_FALSE;
                if (jf_lit(&c, "false"))
                    goto done;
            } else if (ch == 'n') {
                f->type = JF_NULL;
                if (jf_lit(&c, "null"))
                    goto done;
            } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
                if (jf_number(&c, f))
                    goto done;
            } else {
                jf_fail(&c, ch == '{' || ch == '[' ? "nested value (the log is flat)" : "bad value");
                goto done;
            }
            o->n++;
            jf_ws(&c);
            if (c.s < c.end && *c.s == ',') {
                c.s++;
                continue;
            }
            if (c.s < c.end && *c.s == '}') {
                c.s++;
                break;
            }
            jf_fail(&c, "',' or '}' expected");
            goto done;
        }
    }
    jf_ws(&c);
    if (c.s != c.end) {
        jf_fail(&c, "trailing bytes after the object");
        goto done;
    }
    rc = 0;
done:
    if (rc != 0) {
        size_t at = strlen(o->error);
        snprintf(o->error + at, sizeof o->error - at, " (byte %ld)", (long)(c.s - begin));
    }
    return rc;
}

static inline const jf_field *jf_get(const jf_object *o, const char *key) {
    for (size_t i = 0; i < o->n; i++)
        if (strcmp(o->f[i].key, key) == 0)
            return &o->f[i];
    return NULL;
}

/* The string value of key, or NULL when absent or not a string. */
static inline const char *jf_str(const jf_object *o, const char *key) {
    const jf_field *f = jf_get(o, key);
    return f && f->type == JF_STRING ? f->str : NULL;
}

/* The number value of key; *ok false when absent or not a number. */
static inline double jf_num(const jf_object *o, const char *key, bool *ok) {
    const jf_field *f = jf_get(o, key);
    *ok = f && f->type == JF_NUMBER;
    return *ok ? f->num : 0;
}

#endif
