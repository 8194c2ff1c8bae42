-- Everything the extension stageflow defines, one line per fact, in a stable order: two databases
-- whose listings are equal have the same schema objects, definitions, grants and comments.
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'stageflow'),
members AS (
    SELECT d.classid, d.objid FROM pg_depend d, ext WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
),
rels AS (
    SELECT c.oid, c.relname, c.relkind FROM pg_class c WHERE c.relnamespace = 'stageflow'::regnamespace
)
SELECT line FROM (
    SELECT 'member ' || pg_describe_object(classid, objid, 0) AS line FROM members
    UNION ALL
    SELECT format('schema %s owner-acl %s %s', n.nspname, (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(n.nspacl) AS x), obj_description(n.oid, 'pg_namespace'))
      FROM pg_namespace n WHERE n.nspname = 'stageflow'
    UNION ALL
    SELECT format('relation %s kind %s persistence %s options %s acl %s comment %s', c.relname, c.relkind, c.relpersistence,
                  c.reloptions, (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) AS x), obj_description(c.oid, 'pg_class'))
      FROM pg_class c WHERE c.relnamespace = 'stageflow'::regnamespace AND c.relkind <> 'i'
    UNION ALL
    SELECT format('column %s.%s #%s %s collation %s notnull %s default %s identity %s generated %s acl %s comment %s', r.relname,
                  a.attname,
                  (SELECT count(*) FROM pg_attribute b WHERE b.attrelid = a.attrelid AND b.attnum > 0 AND NOT b.attisdropped AND b.attnum <= a.attnum),
                  format_type(a.atttypid, a.atttypmod), a.attcollation::regcollation, a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity,
                  a.attgenerated, (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(a.attacl) AS x), col_description(a.attrelid, a.attnum))
      FROM pg_attribute a JOIN rels r ON r.oid = a.attrelid LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attnum > 0 AND NOT a.attisdropped AND r.relkind IN ('r', 'v', 'p', 'c', 'm')
    UNION ALL
    SELECT format('constraint %s.%s %s', r.relname, co.conname, pg_get_constraintdef(co.oid))
      FROM pg_constraint co JOIN rels r ON r.oid = co.conrelid
    UNION ALL
    SELECT format('index %s comment %s', pg_get_indexdef(c.oid), obj_description(c.oid, 'pg_class'))
      FROM pg_class c WHERE c.relnamespace = 'stageflow'::regnamespace AND c.relkind = 'i'
    UNION ALL
    SELECT format('view %s %s', r.relname, md5(pg_get_viewdef(r.oid))) FROM rels r WHERE r.relkind IN ('v', 'm')
    UNION ALL
    SELECT format('trigger %s', pg_get_triggerdef(t.oid)) FROM pg_trigger t JOIN rels r ON r.oid = t.tgrelid WHERE NOT t.tgisinternal
    UNION ALL
    SELECT format('policy %s.%s %s %s using %s check %s', r.relname, p.polname, p.polcmd, p.polroles::regrole[],
                  pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
      FROM pg_policy p JOIN rels r ON r.oid = p.polrelid
    UNION ALL
    SELECT format('function %s owner %s acl %s comment %s definition %s', p.oid::regprocedure, pg_get_userbyid(p.proowner), (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) AS x),
                  obj_description(p.oid, 'pg_proc'), CASE WHEN p.prokind IN ('f', 'p', 'w') THEN md5(pg_get_functiondef(p.oid)) END)
      FROM pg_proc p WHERE p.pronamespace = 'stageflow'::regnamespace
    UNION ALL
    SELECT format('type %s kind %s comment %s', t.typname, t.typtype, obj_description(t.oid, 'pg_type'))
      FROM pg_type t WHERE t.typnamespace = 'stageflow'::regnamespace AND t.typrelid = 0 AND t.typelem = 0
    UNION ALL
    SELECT format('domain %s over %s notnull %s default %s constraint %s %s', t.typname, format_type(t.typbasetype, t.typtypmod),
                  t.typnotnull, t.typdefault, co.conname, pg_get_constraintdef(co.oid))
      FROM pg_type t LEFT JOIN pg_constraint co ON co.contypid = t.oid
     WHERE t.typnamespace = 'stageflow'::regnamespace AND t.typtype = 'd'
    UNION ALL
    SELECT format('dumped %s where %s', c, w)
      FROM pg_extension e, unnest(e.extconfig::regclass[], e.extcondition) AS u(c, w) WHERE e.extname = 'stageflow'
    UNION ALL
    SELECT format('default-acl %s %s %s', pg_get_userbyid(d.defaclrole), d.defaclobjtype, (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(d.defaclacl) AS x))
      FROM pg_default_acl d WHERE d.defaclnamespace = 'stageflow'::regnamespace
) facts ORDER BY line;
