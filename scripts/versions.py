#!/usr/bin/env python3
"""The extension's versions: the install script of each, and the upgrade scripts between them.

  sql/versions/stageflow--V.sql   the install script of version V, as `cargo pgrx schema` wrote it
                                  when V was made; kept, so that tests install older versions
  sql/versions/released           the versions released, with the sha256 of their install script
                                  and of the upgrade script into them: neither changes again
  sql/upgrades/OLD--NEW.sql       what changes in the tables from OLD to NEW, by hand, in two parts
                                  split by a line `-- @definitions`: before (tables, data carried
                                  over) and after (what needs NEW's functions)
  sql/stageflow--OLD--NEW.sql     the upgrade script (ALTER EXTENSION stageflow UPDATE), written by
                                  `write` from the three above: it
                                    1. drops every function and view of OLD (NEW defines all again;
                                       no table's default, check or index uses one),
                                    2. creates the tables NEW adds, with their indexes and dump marks,
                                    3. runs the first hand-written part (which makes the
                                       domains NEW adds: it knows when their CHECKs may come),
                                    4. creates NEW's functions, views, roles, grants and built-in job
                                       types, in the order of NEW's install script,
                                    5. runs the second hand-written part.

usage:
  scripts/versions.py write     record the current version's install script (`cargo pgrx schema`)
                                and write the upgrade script into it from the version before
  scripts/versions.py check     what CI checks (scripts/test.sh): the current install script is the
                                recorded one (else: a schema change without recording it, or of a
                                released version without a version bump), released versions are
                                unchanged, every recorded version upgrades to the current one with
                                an up-to-date script, and every C symbol a version's script names
                                keeps one signature across versions and is in the built library
  scripts/versions.py release   mark the current version released

Environment: PG_CONFIG (default /usr/lib/postgresql/15/bin/pg_config), CARGO_TARGET_DIR.
"""
import hashlib
import re
import subprocess
import sys
import tempfile
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DOLLAR_QUOTE = re.compile(r'\$([A-Za-z_][A-Za-z0-9_]*)?\$')


def tokens(text):
    """The pieces of an SQL text, in order, as (kind, text): 'comment' (`--` to the end of the line
    and its newline, or `/* */`), 'space', 'quoted' (a string literal, a quoted identifier or a
    dollar-quoted body, whole), ';', and 'code' (one character of anything else)."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith('--', i):
            j = text.find('\n', i)
            j = n if j < 0 else j + 1
            kind = 'comment'
        elif text.startswith('/*', i):
            j = text.find('*/', i)
            j = n if j < 0 else j + 2
            kind = 'comment'
        elif c.isspace():
            j = i
            while j < n and text[j].isspace():
                j += 1
            kind = 'space'
        elif c in "'\"":
            j = i + 1
            while True:
                k = text.find(c, j)
                if k < 0:
                    j = n
                    break
                if k + 1 < n and text[k + 1] == c:
                    j = k + 2
                    continue
                j = k + 1
                break
            kind = 'quoted'
        elif c == '$' and (m := DOLLAR_QUOTE.match(text, i)):
            k = text.find(m.group(0), m.end())
            j = n if k < 0 else k + len(m.group(0))
            kind = 'quoted'
        else:
            j = i + 1
            kind = ';' if c == ';' else 'code'
        yield kind, text[i:j]
        i = j


def statements(text):
    """The statements of an SQL script, each with the comments before it."""
    out, buf = [], []
    for kind, piece in tokens(text):
        buf.append(piece)
        if kind == ';':
            out.append(''.join(buf))
            buf = []
    return out


def canonical(statement):
    """A statement without its comments and with its layout collapsed to single spaces, outside
    string literals, quoted identifiers and dollar-quoted bodies, which are kept as they are (a
    function's body is what PostgreSQL stores, comments and spaces included)."""
    out = []
    for kind, piece in tokens(statement):
        if kind in ('space', 'comment'):
            if out and out[-1] != ' ':
                out.append(' ')
        else:
            out.append(piece)
    return ''.join(out).strip()


TABLE = re.compile(r'^CREATE TABLE stageflow\.(\w+)', re.I)
ON_TABLE = re.compile(r'^CREATE (?:UNIQUE )?INDEX \w+ ON stageflow\.(\w+)', re.I)
DOMAIN = re.compile(r'^CREATE DOMAIN stageflow\.(\w+)', re.I)
DUMPED = re.compile(r"^SELECT pg_catalog\.pg_extension_config_dump\('stageflow\.(\w+)'", re.I)
DEFINITIONS = re.compile(r'^(CREATE (OR REPLACE )?(FUNCTION|PROCEDURE|VIEW)|COMMENT ON (FUNCTION|VIEW)|GRANT|REVOKE|DO |'
                         r'ALTER FUNCTION|SELECT stageflow\.register_job_type\(|INSERT INTO stageflow\.job_types )', re.I)


def tables(script):
    return {m.group(1) for s in statements(script) if (m := TABLE.match(canonical(s)))}


def domains(script):
    return {m.group(1) for s in statements(script) if (m := DOMAIN.match(canonical(s)))}


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def upgrade_script(old, new):
    """The text of sql/stageflow--OLD--NEW.sql."""
    old_script, new_script = read(f'sql/versions/stageflow--{old}.sql'), read(f'sql/versions/stageflow--{new}.sql')
    before, marker, after = read(f'sql/upgrades/{old}--{new}.sql').partition('-- @definitions\n')
    if not marker:
        sys.exit(f'sql/upgrades/{old}--{new}.sql has no line "-- @definitions"')
    added = tables(new_script) - tables(old_script)
    new_tables, definitions = [], []
    for statement in statements(new_script):
        line = canonical(statement)
        target = TABLE.match(line) or ON_TABLE.match(line) or DUMPED.match(line)
        if target and target.group(1) in added:
            new_tables.append(statement.strip('\n'))
        elif DEFINITIONS.match(line):
            definitions.append(statement.strip('\n'))
        elif domain := DOMAIN.match(line):
            # A domain NEW adds is made by the hand-written part, which knows when its CHECK may
            # come (a column changed to a domain with a CHECK is written again whole; with the
            # CHECK added afterwards, its rows are only read).
            if domain.group(1) not in domains(old_script) and not re.search(
                    rf'^CREATE DOMAIN stageflow\.{domain.group(1)}\b', before, re.M | re.I):
                sys.exit(f'stageflow--{new}.sql adds the domain stageflow.{domain.group(1)}: '
                         f'sql/upgrades/{old}--{new}.sql must make it (before "-- @definitions")')
        elif line and not target:
            sys.exit(f'stageflow--{new}.sql: a statement scripts/versions.py does not know where to put: {line[:200]}')
    out = [
        f'-- Stageflow {old} -> {new}: ALTER EXTENSION stageflow UPDATE TO \'{new}\'.',
        f'-- Written by scripts/versions.py write from sql/versions/ and sql/upgrades/{old}--{new}.sql;',
        '-- edit those, not this file.',
        f"\\echo Use \"ALTER EXTENSION stageflow UPDATE TO '{new}'\" to load this file. \\quit",
        '',
        f'-- 1. Every function and view of {old} goes: {new} defines all of them again below.',
        '''DO $upgrade$
DECLARE
    r record;
BEGIN
    -- (the extension's members only: not what someone else created in its schema)
    FOR r IN SELECT c.oid::regclass AS name FROM pg_catalog.pg_class AS c
               JOIN pg_catalog.pg_depend AS d ON d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
              WHERE c.relnamespace = 'stageflow'::regnamespace AND c.relkind IN ('v', 'm') LOOP
        EXECUTE format('DROP VIEW %s', r.name);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS name FROM pg_catalog.pg_proc AS p
               JOIN pg_catalog.pg_depend AS d ON d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid
                AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
              WHERE p.pronamespace = 'stageflow'::regnamespace LOOP
        EXECUTE format('DROP ROUTINE %s', r.name);
    END LOOP;
END
$upgrade$;''',
        '',
        f'-- 2. The tables {new} adds.',
        *new_tables,
        '',
        f'-- 3. What changes in the tables of {old} (sql/upgrades/{old}--{new}.sql).',
        before.strip('\n'),
        '',
        f'-- 4. The functions, views, roles, grants and built-in job types of {new}.',
        *definitions,
        '',
        f'-- 5. What needs the functions of {new} (sql/upgrades/{old}--{new}.sql).',
        after.strip('\n'),
        '',
    ]
    return '\n'.join(out)


def version_key(version):
    return tuple(int(part) for part in version.split('.'))


def current_version():
    return re.search(r'^version = "([^"]+)"', read('Cargo.toml'), re.M).group(1)


def recorded_versions():
    names = os.listdir(os.path.join(ROOT, 'sql/versions'))
    found = [m.group(1) for name in names if (m := re.match(r'^stageflow--([0-9.]+)\.sql$', name))]
    return sorted(found, key=version_key)


def released():
    """{version: [sha256 of its install script, sha256 of the upgrade script into it (if any)]} of
    sql/versions/released."""
    path = os.path.join(ROOT, 'sql/versions/released')
    if not os.path.exists(path):
        return {}
    return {line.split()[0]: line.split()[1:] for line in read('sql/versions/released').splitlines() if line.strip()}


def upgrade_into(version):
    """The path of the upgrade script into `version` from the recorded version before it, or None."""
    older = [v for v in recorded_versions() if version_key(v) < version_key(version)]
    return f'sql/stageflow--{older[-1]}--{version}.sql' if older else None


def sha256(path):
    with open(os.path.join(ROOT, path), 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def pg_config():
    return os.environ.get('PG_CONFIG', '/usr/lib/postgresql/15/bin/pg_config')


def generated_install_script():
    """The install script `cargo pgrx schema` writes for the code as it is."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'schema.sql')
        run = subprocess.run(['cargo', 'pgrx', 'schema', 'pg15', '--pg-config', pg_config(), '-o', out],
                             cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f'cargo pgrx schema failed:\n{run.stdout}{run.stderr}')
        with open(out) as f:
            return f.read()


def normalized(script):
    """The statements of a script, canonical, sorted: `cargo pgrx schema` does not write its
    statements in the same order from one run to the next."""
    return sorted(line for s in statements(script) if (line := canonical(s)))


def symbols(script):
    """{C symbol: its CREATE FUNCTION without name and comments} of a script."""
    found = {}
    for statement in statements(script):
        line = canonical(statement)
        m = re.search(r"AS 'MODULE_PATHNAME', '(\w+)'", line)
        if m:
            found[m.group(1)] = re.sub(r'^CREATE +FUNCTION +"?\w+"?', '', line.replace(m.group(0), ''))
    return found


BLOCK = '/* <begin connected objects> */'


def in_recorded_order(script, recorded):
    """`script` with its blocks of connected objects in the order `recorded` has them, when both
    have the same blocks (each named by its header, the lines before its first empty one: the
    source file, without the line number, which moves when lines are added above the item, and
    the item or what the block requires); else `script` as it is. pgrx orders the blocks by their
    dependencies and breaks ties at random, so the same order as before keeps a recorded script's
    diff to what changed."""
    def name(block):
        header = block.strip('\n').split('\n\n')[0]
        return re.sub(r'^(-- \S+):\d+$', r'\1', header, count=1, flags=re.M)

    def blocks(text):
        head, *rest = text.split(BLOCK)
        return head, {name(b): BLOCK + b for b in rest}, len(rest)
    head, new, count = blocks(script)
    _, old, old_count = blocks(recorded)
    if count != len(new) or old_count != len(old) or set(new) != set(old):
        return script
    return head + ''.join(new[name] for name in old)


def write():
    version = current_version()
    if version in released():
        sys.exit(f'{version} is released: its schema does not change again; bump the version in Cargo.toml first')
    path = f'sql/versions/stageflow--{version}.sql'
    script = generated_install_script()
    if os.path.exists(os.path.join(ROOT, path)):
        script = in_recorded_order(script, read(path))
    with open(os.path.join(ROOT, path), 'w') as f:
        f.write(script)
    print(path)
    older = [v for v in recorded_versions() if version_key(v) < version_key(version)]
    if older:
        old = older[-1]
        if not os.path.exists(os.path.join(ROOT, f'sql/upgrades/{old}--{version}.sql')):
            sys.exit(f'write sql/upgrades/{old}--{version}.sql (the table changes, by hand), then run this again')
        path = f'sql/stageflow--{old}--{version}.sql'
        with open(os.path.join(ROOT, path), 'w') as f:
            f.write(upgrade_script(old, version))
        print(path)


def check():
    version, problems = current_version(), []
    recorded = recorded_versions()
    if version not in recorded:
        problems.append(f'sql/versions/stageflow--{version}.sql is missing: run scripts/versions.py write')
    elif normalized(generated_install_script()) != normalized(read(f'sql/versions/stageflow--{version}.sql')):
        if version in released():
            problems.append(f'the schema changed, but {version} is released: bump the version in Cargo.toml, write '
                            f'sql/upgrades/{version}--<new>.sql and run scripts/versions.py write')
        else:
            problems.append(f'the schema changed: run scripts/versions.py write (and update sql/upgrades/ to match)')
    for v, digests in released().items():
        if v not in recorded or sha256(f'sql/versions/stageflow--{v}.sql') != digests[0]:
            problems.append(f'sql/versions/stageflow--{v}.sql is not what was released (sha256 {digests[0]})')
        upgrade = upgrade_into(v) if v in recorded else None
        if upgrade and (len(digests) < 2 or not os.path.exists(os.path.join(ROOT, upgrade))
                        or sha256(upgrade) != digests[1]):
            problems.append(f'{upgrade} is not what was released with {v}')
    for v in recorded:
        if version_key(v) < version_key(version) and v not in released():
            problems.append(f'{v} is older than the current version {version} but not marked released')
    for old, new in zip(recorded, recorded[1:]):
        path = f'sql/stageflow--{old}--{new}.sql'
        if not os.path.exists(os.path.join(ROOT, path)):
            problems.append(f'{path} is missing: write sql/upgrades/{old}--{new}.sql and run scripts/versions.py write')
        elif read(path) != upgrade_script(old, new):
            problems.append(f'{path} is not what scripts/versions.py write makes of sql/upgrades/{old}--{new}.sql')
    library = subprocess.run([pg_config(), '--pkglibdir'], capture_output=True, text=True, check=True).stdout.strip()
    exported = set(subprocess.run(['nm', '-D', '--defined-only', f'{library}/stageflow.so'], capture_output=True,
                                  text=True, check=True).stdout.split())
    signatures = {}
    for v in recorded:
        for symbol, signature in symbols(read(f'sql/versions/stageflow--{v}.sql')).items():
            if symbol not in exported:
                problems.append(f'{library}/stageflow.so lacks {symbol}, which version {v} calls')
            first = signatures.setdefault(symbol, (v, signature))
            if first[1] != signature:
                problems.append(f'the C function {symbol} is declared differently by {first[0]} and {v}: a schema of '
                                f'{first[0]} calls this library until ALTER EXTENSION UPDATE, so a new signature needs '
                                f'a new symbol')
    for problem in problems:
        print(f'scripts/versions.py check: {problem}', file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f'scripts/versions.py check: {version}; versions {", ".join(recorded)}; '
          f'released {", ".join(released()) or "none"}; {len(signatures)} C symbols')


def release():
    version = current_version()
    digests = released()
    upgrade = upgrade_into(version)
    digests[version] = [sha256(f'sql/versions/stageflow--{version}.sql')] + ([sha256(upgrade)] if upgrade else [])
    with open(os.path.join(ROOT, 'sql/versions/released'), 'w') as f:
        for v, d in sorted(digests.items(), key=lambda i: version_key(i[0])):
            f.write(' '.join([v, *d]) + '\n')


if __name__ == '__main__':
    commands = {'write': write, 'check': check, 'release': release}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]]()
